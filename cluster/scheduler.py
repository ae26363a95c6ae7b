"""The two training loops, as plain code over a small interface (`Rollouts`).

- sync (`SyncScheduler`): collect `groups_per_step` groups with policy v (one group per worker
  at a time), train, send v+1 and wait until every worker loaded it before sampling again;
- async (`AsyncScheduler`): every worker always has a group in flight; finished groups enter a
  buffer; the learner trains whenever the buffer holds a batch of groups whose oldest token is at
  most `max_staleness` versions behind (older ones are dropped and counted), and new weights go
  to the workers while they keep sampling.

The schedulers see group metadata and opaque references only (`cluster.accounting.Finished`); the
groups go from the workers to the learner by reference. `cluster.fleet.RayRollouts` implements
`Rollouts` over the actors; tests/test_scheduler.py drives both loops with fakes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from cluster.accounting import Finished, Ledger
from core.group_meta import GroupMeta


class GroupLost(RuntimeError):
    """A run_group call that did not return a group (it raised or timed out)."""


class WorkerDied(GroupLost):
    """A run_group call whose worker's actor is gone (process killed, node lost): the worker is
    replaced (`Rollouts.restart`, within the restart budget) and its groups are re-issued."""


class Rollouts(Protocol):
    """What the schedulers ask of the actors. Handles are opaque and hashable."""

    num_workers: int

    def dispatch(self, worker: int, task: str, seed: int, group_size: int) -> Any:
        """Starts one group on a worker; returns its pending handle."""

    def wait_any(self, handles: list[Any]) -> Any:
        """Blocks until one of `handles` (groups or a training step) is ready; returns it."""

    def collect(self, handle: Any) -> tuple[GroupMeta, Any]:
        """A finished group's metadata and the reference to the group; raises GroupLost."""

    def start_train(self, refs: list[Any]) -> Any:
        """Starts one learner step on the groups behind `refs`; returns a waitable handle."""

    def train_result(self, handle: Any) -> dict[str, Any]:
        """The learner's metrics of a started step (blocks until it is done)."""

    def send_weights(self) -> Any:
        """Starts sending the learner's current version to every worker (`.version`)."""

    def wait_weights(self, send: Any) -> None:
        """Waits until every worker loaded what `send` sent (None: nothing to wait for)."""

    def sleep_engines(self) -> None: ...

    def wake_engines(self) -> None: ...

    def engine_calls(self) -> float:
        """Engine calls the workers made so far (async: overlap of sampling and training)."""

    def forget(self, handle: Any) -> None:
        """A dispatched group that will never be collected (its worker died)."""

    def restart(self, worker: int, error: BaseException) -> dict[str, Any]:
        """Replaces a dead worker by a new one at the same placement, loaded with the learner's
        current version before it samples; returns the dead one's books: its last known stats and
        `episodes_returned` (episodes of its groups collected). Raises TrainingError when it
        cannot (e.g. NCCL weight sync)."""


@dataclass
class Progress:
    """Where the run is: learner steps done and the version every worker has (or is loading)."""

    step: int = 0
    version: int = 0
    learner_busy_s: float = 0.0


@dataclass
class StepDone:
    """One learner step, handed to the driver (accounting, metrics, checkpoint, evaluation)."""

    batch: list[Finished]
    learner_metrics: dict[str, Any]
    version_before: int
    collect_s: float
    train_s: float
    sync_s: float
    step_wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    overlap: dict[str, float] | None = None
    """Async: groups in flight and engine calls while the learner trained."""


@dataclass
class Loop:
    """What both loops share: the actors, the books and the run's shape."""

    rollouts: Rollouts
    ledger: Ledger
    progress: Progress
    total_steps: int
    groups_per_step: int
    group_size: int
    on_step: Callable[[StepDone], None]
    in_flight: dict[Any, tuple[int, Any]] = field(default_factory=dict)
    """handle -> (worker, sampler instance) of every group dispatched and not yet received."""

    def dispatch(self, worker: int) -> None:
        """Sends the sampler's next instance to a worker."""
        inst = self.ledger.sampler.next()
        self.in_flight[self.rollouts.dispatch(worker, inst.task, inst.seed, self.group_size)] = (worker, inst)

    def receive(self, handle: Any) -> tuple[int | None, Finished | None]:
        """(worker, its group) of a finished call; the group is None when it failed or was lost
        (counted). The worker is None when it died and was replaced: its groups were re-issued
        to the replacement, so it is not free."""
        worker, inst = self.in_flight.pop(handle)
        try:
            meta, ref = self.rollouts.collect(handle)
        except WorkerDied as e:
            self.replace(worker, inst, e.__cause__ or e)
            return None, None
        except GroupLost as e:
            self.ledger.lost(inst, e.__cause__ or e)
            return worker, None
        return worker, self.ledger.receive(meta, ref, inst)

    def replace(self, worker: int, inst: Any, error: BaseException) -> None:
        """A worker died running `inst`: within the restart budget, a new worker takes its place
        (current weights loaded) and every group the dead one had in flight is re-issued to it
        with the same task instance (task, seed, sampler index), so the sampler's order and a
        resume's cursor are as if nothing happened."""
        self.ledger.allow_restart(f"w{worker}", error)
        others = [h for h, (w, _) in self.in_flight.items() if w == worker]
        lost = [inst] + [self.in_flight.pop(h)[1] for h in others]
        for h in others:  # handles of the dead actor: never collected, their refs are forgotten
            self.rollouts.forget(h)
        retired = self.rollouts.restart(worker, error)
        self.ledger.worker_replaced(f"w{worker}", error, retired, lost, self.group_size)
        for i in lost:
            self.in_flight[self.rollouts.dispatch(worker, i.task, i.seed, self.group_size)] = (worker, i)

    def drain(self, buffer: deque) -> None:
        """The end of a run: buffered groups and groups still in flight are dropped as run_ended."""
        for f in buffer:
            self.ledger.drop("run_ended", f)
        buffer.clear()
        for handle, (_, inst) in list(self.in_flight.items()):
            try:
                meta, ref = self.rollouts.collect(handle)
            except Exception:  # noqa: BLE001 - the worker died at the end: its episodes are in its stats
                self.ledger.lost_at_end(inst)
                continue
            self.ledger.accounting.returned += meta.num_episodes
            self.ledger.drop("run_ended", Finished(meta, ref, inst))
        self.in_flight.clear()


class SyncScheduler:
    """On-policy: every group of step v is sampled by v (see the module docstring)."""

    def __init__(self, loop: Loop, engines_sleep: bool = False) -> None:
        self.loop = loop
        self.engines_sleep = engines_sleep
        """Colocated: the engines sleep while the learner trains (it gets the GPU memory)."""

    def collect_batch(self) -> list[Finished]:
        loop = self.loop
        batch: list[Finished] = []
        free = list(range(loop.rollouts.num_workers))
        while len(batch) < loop.groups_per_step:
            while free and len(batch) + len(loop.in_flight) < loop.groups_per_step:
                loop.dispatch(free.pop(0))
            worker, finished = loop.receive(loop.rollouts.wait_any(list(loop.in_flight)))
            if worker is not None:  # None: replaced, its group re-issued (still in flight)
                free.append(worker)
            if finished is not None:
                batch.append(finished)
        return batch

    def run(self) -> None:
        loop, rollouts, progress = self.loop, self.loop.rollouts, self.loop.progress
        while progress.step < loop.total_steps:
            t0 = time.monotonic()
            batch = self.collect_batch()
            collect_s = time.monotonic() - t0
            # --- train on them, then every worker loads v+1 before sampling again ---
            version_before = progress.version
            t1 = time.monotonic()
            if self.engines_sleep:
                rollouts.sleep_engines()
            t_learner = time.monotonic()
            metrics = rollouts.train_result(rollouts.start_train([f.ref for f in batch]))
            progress.learner_busy_s += time.monotonic() - t_learner
            if self.engines_sleep:
                rollouts.wake_engines()
            train_s = time.monotonic() - t1
            t2 = time.monotonic()
            send = rollouts.send_weights()
            rollouts.wait_weights(send)
            progress.version = send.version
            sync_s = time.monotonic() - t2
            progress.step += 1
            loop.on_step(StepDone(batch, metrics, version_before, collect_s, train_s, sync_s,
                                  time.monotonic() - t0, {"groups_dropped_stale": 0.0}))


class AsyncScheduler:
    """Off-policy by at most `max_staleness` versions (see the module docstring)."""

    def __init__(self, loop: Loop, max_staleness: int) -> None:
        self.loop = loop
        self.max_staleness = max_staleness
        self.buffer: deque[Finished] = deque()
        self.train_handle: Any = None
        self.train_batch: list[Finished] = []
        self.version_before = 0
        self.pending_send: Any = None
        """The previous weight send, waited for before the next one starts."""
        self.stale_this_step = 0
        self.calls_at_train_start = 0.0
        self.in_flight_at_start = 0
        self.train_t0 = self.step_t0 = self.wait_t0 = time.monotonic()
        self.collect_s = 0.0

    def _too_old(self, meta: GroupMeta) -> bool:
        return self.loop.progress.version - meta.min_policy_version > self.max_staleness

    def _drop_stale(self, finished: Finished) -> None:
        self.loop.ledger.drop("stale", finished)
        self.stale_this_step += 1

    def maybe_start_train(self) -> None:
        """Starts a learner step when a batch of fresh-enough groups is buffered."""
        loop = self.loop
        while self.buffer and self._too_old(self.buffer[0].meta):
            self._drop_stale(self.buffer.popleft())
        if len(self.buffer) < loop.groups_per_step:
            return
        self.collect_s = time.monotonic() - self.wait_t0
        self.train_batch = [self.buffer.popleft() for _ in range(loop.groups_per_step)]
        self.version_before = loop.progress.version
        lags = [self.version_before - f.meta.min_policy_version for f in self.train_batch]
        assert max(lags) <= self.max_staleness, lags  # the filter above guarantees it
        self.train_handle = loop.rollouts.start_train([f.ref for f in self.train_batch])
        self.train_t0 = time.monotonic()
        self.in_flight_at_start = len(loop.in_flight)
        self.calls_at_train_start = loop.rollouts.engine_calls()

    def finish_train(self) -> None:
        """The learner step is done: send v+1 (workers load it between engine batches, without
        stopping), then hand the step to the driver."""
        loop, rollouts, progress = self.loop, self.loop.rollouts, self.loop.progress
        metrics = rollouts.train_result(self.train_handle)
        train_s = time.monotonic() - self.train_t0
        progress.learner_busy_s += train_s
        self.train_handle = None
        overlap = {
            "rollout_in_flight_during_train": float(min(self.in_flight_at_start, len(loop.in_flight))),
            "engine_calls_during_train": rollouts.engine_calls() - self.calls_at_train_start,
        }
        t2 = time.monotonic()
        rollouts.wait_weights(self.pending_send)  # the previous version reached everyone
        if self.pending_send is not None:
            progress.version = self.pending_send.version
        self.pending_send = rollouts.send_weights()
        # Groups sampled from here on may carry the new version; staleness counts it.
        progress.version = self.pending_send.version
        sync_s = time.monotonic() - t2
        progress.step += 1
        done = StepDone(self.train_batch, metrics, self.version_before, self.collect_s, train_s, sync_s,
                        time.monotonic() - self.step_t0,
                        {"groups_dropped_stale": float(self.stale_this_step), **overlap}, overlap)
        self.stale_this_step = 0
        self.step_t0 = self.wait_t0 = time.monotonic()
        loop.on_step(done)

    def on_group(self, handle: Any) -> None:
        """A group finished: the worker gets its next instance at once."""
        worker, finished = self.loop.receive(handle)
        if worker is None:  # it died; its replacement runs the re-issued group
            return
        self.loop.dispatch(worker)
        if finished is None:
            return
        if self._too_old(finished.meta):
            self._drop_stale(finished)
        else:
            self.buffer.append(finished)

    def run(self) -> None:
        loop = self.loop
        for i in range(loop.rollouts.num_workers):
            loop.dispatch(i)
        self.version_before = loop.progress.version
        self.train_t0 = self.step_t0 = self.wait_t0 = time.monotonic()
        try:
            while loop.progress.step < loop.total_steps:
                if self.train_handle is None:
                    self.maybe_start_train()
                waitables = list(loop.in_flight) + ([self.train_handle] if self.train_handle is not None else [])
                ready = loop.rollouts.wait_any(waitables)
                if self.train_handle is not None and ready == self.train_handle:
                    self.finish_train()
                else:
                    self.on_group(ready)
            loop.rollouts.wait_weights(self.pending_send)
        except BaseException:
            loop.in_flight.clear()  # an error or Ctrl-C: close() stops the workers, nothing to wait for
            raise
        # --- drain: groups still in flight finish and are counted as run_ended ---
        loop.drain(self.buffer)
