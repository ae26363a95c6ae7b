"""How a weight update reaches a running engine: drained or in flight (`engine.weight_update`).

- "drained" (the default; sync runs always): an update takes the engine lock, so it waits until
  the generate call running now has finished every request, loads, and only then may the next call
  start.
- "in_flight" (async runs, vLLM backend): an update is *posted*; the generate call running now
  applies it between two engine steps (actors/engines/vllm_stepper.py) and carries on with the
  requests it was running, whose later tokens are stamped with the new version. With no call
  running, the update loads at once, as a drained one does.

Either way an update is one `job` (load every tensor, reset the caches, move the version) that runs
while no engine step runs, and updates run one at a time. `UpdateTiming` records what each update
cost the engine, so the two modes can be compared in one run (bench/bench_inflight.py):

- `idle_s`: time the engine could not generate because of the update: the load holding the
  engine (drained, or in flight with no call running), or from the moment the running call paused
  its requests until they were running again (in flight);
- `wait_s`: from the update's arrival until its load began (drained: the rest of the running call;
  in flight: the rest of one engine step);
- `reprefill_tokens`: tokens computed again because a request was resumed under new weights.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

WEIGHT_UPDATE_MODES = ("drained", "in_flight")


class UpdateTiming:
    """Running totals of what weight updates cost one engine (read by `stats()`)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._lock = threading.Lock()
        self.updates = 0
        self.idle_s = 0.0
        self.wait_s = 0.0
        self.applied_mid_call = 0
        self.reprefill_tokens = 0
        self.last_idle_s = 0.0

    def record(self, idle_s: float, wait_s: float, mid_call: bool, reprefill_tokens: int = 0) -> None:
        with self._lock:
            self.updates += 1
            self.idle_s += idle_s
            self.wait_s += wait_s
            self.applied_mid_call += int(mid_call)
            self.reprefill_tokens += reprefill_tokens
            self.last_idle_s = idle_s

    def stats(self) -> dict[str, Any]:
        with self._lock:
            n = max(self.updates, 1)
            return {
                "weight_update_mode": self.mode,
                "weight_updates": self.updates,
                "weight_updates_mid_call": self.applied_mid_call,
                "weight_update_idle_s": self.idle_s,
                "weight_update_idle_s_mean": self.idle_s / n,
                "weight_update_wait_s_mean": self.wait_s / n,
                "weight_update_reprefill_tokens": self.reprefill_tokens,
            }


class _Posted:
    """One update waiting for the engine: its job, when it arrived, and its outcome."""

    def __init__(self, job: Callable[[], None]) -> None:
        self.job = job
        self.arrived = time.monotonic()
        self.started = 0.0
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.started = time.monotonic()
        try:
            self.job()
        except BaseException as err:  # noqa: BLE001 - handed back to the thread that posted it
            self.error = err
        finally:
            self.done.set()


class UpdateGate:
    """Serialises weight updates against generation on one engine.

    `engine_lock` is held by every generate call for its whole duration and by every load. In
    in-flight mode a generate call checks `pending()` between engine steps and calls
    `run_posted()`; an update whose job ran there returns as soon as it has (it does not wait for
    the call to end). An update posted while no call runs is run by its own thread, which takes the
    engine lock (a call that starts meanwhile runs it instead, between its steps).
    """

    POLL_S = 0.005  # how often a posting thread re-checks; bounds its delay after its job ran

    def __init__(self, engine_lock: threading.Lock, mode: str = "drained") -> None:
        self.engine_lock = engine_lock
        self.timing = UpdateTiming(mode)
        self._serial = threading.Lock()  # one update at a time (they share the staging file)
        self._posted: list[_Posted] = []
        self._posted_lock = threading.Lock()
        self.set_mode(mode)

    @property
    def mode(self) -> str:
        return self.timing.mode

    def set_mode(self, mode: str) -> None:
        if mode not in WEIGHT_UPDATE_MODES:
            raise ValueError(f"engine.weight_update must be one of {WEIGHT_UPDATE_MODES}, got {mode!r}")
        self.timing.mode = mode

    def serial(self) -> threading.Lock:
        """Held by an update from before its staging (outside the engine lock) to its end."""
        return self._serial

    def apply(self, job: Callable[[], None]) -> None:
        """Runs `job` while no engine step runs (see the class docstring); re-raises its error."""
        if self.mode == "drained":
            arrived = time.monotonic()
            with self.engine_lock:
                started = time.monotonic()
                job()
                self.timing.record(time.monotonic() - started, started - arrived, mid_call=False)
            return
        posted = _Posted(job)
        with self._posted_lock:
            self._posted.append(posted)
        while not posted.done.is_set():
            if self.engine_lock.acquire(timeout=self.POLL_S):
                try:
                    if not posted.done.is_set():
                        started = time.monotonic()
                        self.run_posted()
                        if posted.error is None:  # a failed load is no update (as in drained mode)
                            self.timing.record(time.monotonic() - started, started - posted.arrived, mid_call=False)
                finally:
                    self.engine_lock.release()
        if posted.error is not None:
            raise posted.error

    def pending(self) -> bool:
        """Whether an update waits (cheap; checked between engine steps)."""
        return bool(self._posted)

    def run_posted(self) -> list[_Posted]:
        """Runs every posted job in order (the caller holds the engine lock); returns them."""
        with self._posted_lock:
            jobs, self._posted = self._posted, []
        for posted in jobs:
            posted.run()
        return jobs
