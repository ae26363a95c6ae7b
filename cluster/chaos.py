"""Chaos run: a real training run in which real processes are killed at seeded moments, and a
table of what the run did about each.

    python -m cluster.chaos [--chaos-seed 0] [--chaos-kinds chromium,env_server,worker,learner] \
        [--chaos-out FILE.json] [bgrpo train arguments: --config local --cluster.total_steps 8 ...]

Each kind is injected once, one at a time, in a seeded order: the first after a seeded early step,
each next one after the step in which the run booked its predecessor's recovery (the kind's
counter in that step's metrics record: `env_restarts`/`env_failovers`, `worker_restarts`,
`learner_restarts`), so no kill is absorbed by another's recovery. Each lands a seeded 0-2 s into
a step, while groups are being collected or the learner trains:
  - chromium:   SIGKILL of the top Chromium process of one env server;
  - env_server: SIGKILL of one env server process;
  - worker:     SIGKILL of one rollout worker's process (the driver starts a replacement);
  - learner:    SIGKILL of learner rank 0's process (the driver recovers it from a checkpoint).
The table has, per kind: how many were injected, the time to recover (from the kill to the end of
the step that booked the recovery: the failure was handled and training made progress again),
the episodes that failed in that step (a failed episode is never trained: its group is collected
again), and the episodes dropped under the reason the kind's recovery books. A kill whose
recovery is not booked within MAX_WAIT_STEPS steps is reported as not recovered and the next kind
goes on. A run whose last kill is not booked by its last step gets one more step at a time (at
most MAX_WAIT_STEPS per kind), so the run given is a minimum. The run's own books (summary.json)
must still balance: the caller checks them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("chromium", "env_server", "worker", "learner")
MAX_DELAY_S = 2.0
MAX_WAIT_STEPS = 3
# The step-record counters in which the run books each kind's recovery.
BOOKED_IN = {"chromium": ("env_restarts", "env_failovers"), "env_server": ("env_restarts", "env_failovers"),
             "worker": ("worker_restarts",), "learner": ("learner_restarts",)}


@dataclass
class Injection:
    kind: str
    after_step: int
    delay_s: float
    at: float = 0.0
    """time.time() of the kill (0: not done)."""
    pid: int | None = None
    target: str = ""
    error: str = ""
    """Why nothing was killed (no such process at that moment), if so."""
    booked_step: int | None = None
    """The step whose metrics record booked the recovery (None: not within MAX_WAIT_STEPS)."""
    recover_s: float | None = None
    episodes_failed: int = 0


def plan(kinds: list[str], seed: int) -> list[Injection]:
    """The kinds in a seeded order, the first after step 1 or 2, each with a seeded delay."""
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    return [Injection(kind, rng.choice((1, 2)) if i == 0 else 0, round(rng.uniform(0.0, MAX_DELAY_S), 2))
            for i, kind in enumerate(order)]


def min_steps(kinds: list[str]) -> int:
    """Steps a chaos run is given: the first kill after step 2 at the latest, each kill booked
    within two steps usually, and a step after the last one. A run whose kills take longer to book
    is extended by the monkey (`ChaosMonkey._extend_if_last`)."""
    return 2 + 2 * len(kinds) + 1


def _actor_pid(handle: Any) -> int:
    import ray

    return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60))


def _env_server_pids(trainer: Any) -> list[int]:
    import ray

    pids: list[int] = []
    for worker in trainer.fleet.workers:
        pids += [p for p in ray.get(worker.env_server_pids.remote(), timeout=60) if p]
    return pids


def _top_chromium(server_pid: int) -> int | None:
    """The browser process of an env server: a Chromium whose parent is not a Chromium."""
    import psutil

    try:
        procs = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    chromium = {p.pid for p in procs if "chrom" in (p.name() or "").lower() or "headless_shell" in (p.name() or "")}
    for p in procs:
        try:
            if p.pid in chromium and p.ppid() not in chromium:
                return p.pid
        except psutil.NoSuchProcess:
            continue
    return None


def _target(kind: str, trainer: Any, rng: random.Random) -> tuple[int | None, str]:
    """(pid, description) of the process to kill now."""
    if kind == "worker":
        i = rng.randrange(len(trainer.fleet.workers))
        return _actor_pid(trainer.fleet.workers[i]), f"rollout worker w{i}"
    if kind == "learner":
        return _actor_pid(trainer.fleet.learners[0]), "learner rank 0"
    servers = _env_server_pids(trainer)
    if not servers:
        return None, "no env server process visible from the driver"
    server = rng.choice(servers)
    if kind == "env_server":
        return server, f"env server pid {server}"
    return _top_chromium(server), f"Chromium of env server pid {server}"


@dataclass
class ChaosMonkey:
    """The `on_step` hook of a run: one kill at a time, the next once the last one's recovery is
    booked in a step's metrics record."""

    injections: list[Injection]
    seed: int = 0
    _next: int = 0
    _waiting: Injection | None = None
    _waited: int = 0
    _timers: list[threading.Timer] = field(default_factory=list)
    extended: int = 0
    """Steps added to the run so that its last kill's recovery could be booked."""

    def __call__(self, trainer: Any, step: int) -> None:
        if self._waiting is not None:
            self._check_booked(self._waiting, _step_record(trainer.run_dir, step), step, time.time())
        if self._waiting is None and self._next < len(self.injections):
            inj = self.injections[self._next]
            if step >= inj.after_step:
                inj.after_step = step
                self._next += 1
                self._waiting, self._waited = inj, 0
                timer = threading.Timer(inj.delay_s, self._inject, (trainer, inj))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
        self._extend_if_last(trainer, step)

    def _extend_if_last(self, trainer: Any, step: int) -> None:
        """The last step with a kill not yet made or booked: one more step (at most MAX_WAIT_STEPS
        per kind in all). Bookings take 1-3 steps each, so a fixed length either wastes steps or,
        as once in CI, ends the run right after the last kill, with nothing left to book it."""
        pending = self._waiting is not None or self._next < len(self.injections)
        if (pending and hasattr(trainer, "extend_run") and step >= trainer.config.cluster.total_steps
                and self.extended < MAX_WAIT_STEPS * len(self.injections)):
            self.extended += 1
            trainer.extend_run(1)

    def _check_booked(self, inj: Injection, record: dict[str, Any], step: int, now: float) -> None:
        if inj.error:  # nothing was killed: move on
            self._waiting = None
            return
        if not inj.at:  # the kill has not happened yet (its delay runs into the next step)
            return
        self._waited += 1
        if any(record.get(k, 0) for k in BOOKED_IN[inj.kind]):
            inj.booked_step, inj.recover_s = step, round(now - inj.at, 1)
            inj.episodes_failed = int(record.get("episodes_failed", 0))
            self._waiting = None
        elif self._waited >= MAX_WAIT_STEPS:
            self._waiting = None

    def _inject(self, trainer: Any, inj: Injection) -> None:
        rng = random.Random(f"{self.seed}-{inj.kind}")
        try:
            inj.pid, inj.target = _target(inj.kind, trainer, rng)
            if inj.pid is None:
                inj.error = inj.target
                return
            inj.at = time.time()
            os.kill(inj.pid, signal.SIGKILL)
            log.warning("chaos: killed %s (pid %d) after step %d", inj.target, inj.pid, inj.after_step)
        except Exception as err:  # noqa: BLE001 - a run that ended meanwhile: recorded, not raised
            inj.error = f"{type(err).__name__}: {err}"

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()


# The dropped-episode reason each kind's recovery books (summary.json's accounting); an env-side
# failure fails an episode, and its whole group is collected again (reason "rerun_attempt").
DROP_REASON = {"chromium": "rerun_attempt", "env_server": "rerun_attempt", "worker": "worker_died",
               "learner": "learner_recovered"}


def fault_table(monkey: ChaosMonkey, dropped: dict[str, int]) -> list[dict[str, Any]]:
    """Per kind: count, seconds to recover, episodes failed in the step that booked the recovery,
    and the episodes dropped (to be collected again) under the kind's reason. Two kinds share the
    "rerun_attempt" reason, so for those the dropped figure is the run's total for both."""
    rows: dict[str, dict[str, Any]] = {}
    for inj in monkey.injections:
        row = rows.setdefault(inj.kind, {"kind": inj.kind, "injected": 0, "recover_s": [], "episodes_failed": 0,
                                         "dropped_reason": DROP_REASON[inj.kind],
                                         "episodes_dropped": int(dropped.get(DROP_REASON[inj.kind], 0))})
        if inj.at:
            row["injected"] += 1
        if inj.recover_s is not None:
            row["recover_s"].append(inj.recover_s)
            row["episodes_failed"] += inj.episodes_failed
    return list(rows.values())


def _step_record(run_dir: Any, step: int) -> dict[str, Any]:
    """The metrics record of `step` (written before the step hook runs)."""
    from cluster.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("step") == step and "policy_version" in r and "event" not in r]
    return rows[-1] if rows else {}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| fault | injected | time to recover | episodes failed | episodes dropped and collected again (reason) |",
             "|---|---|---|---|---|"]
    for r in rows:
        recover = ", ".join(f"{s} s" for s in r["recover_s"]) or "not recovered"
        lines.append(f"| {r['kind']} | {r['injected']} | {recover} | {r['episodes_failed']} | "
                     f"{r['episodes_dropped']} ({r['dropped_reason']}) |")
    return "\n".join(lines)


def run(argv: list[str], kinds: list[str], seed: int) -> dict[str, Any]:
    """A whole chaos run: train with the monkey as the step hook; returns summary, injections, table."""
    from cluster import driver
    from cluster.config import parse_cli

    cl = parse_cli(argv)
    if cl.config.cluster.total_steps < min_steps(kinds):
        raise ValueError(f"a chaos run of {len(kinds)} kinds needs cluster.total_steps >= {min_steps(kinds)}")
    monkey = ChaosMonkey(plan(kinds, seed), seed)
    try:
        summary = driver.train(cl.config, cl.resume or None, resume=cl.resume is not None, preset=cl.preset,
                               on_step=monkey)
    finally:
        monkey.cancel()
    run_dir = cl.config.cluster.run_dir
    table = fault_table(monkey, summary["accounting"]["dropped"])
    return {"run_dir": run_dir, "summary": summary, "injections": [asdict(i) for i in monkey.injections],
            "table": table, "extended": monkey.extended}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    seed, kinds, out = 0, list(KINDS), None
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--chaos-seed":
            seed = int(next(it))
        elif arg == "--chaos-kinds":
            kinds = [k for k in next(it).split(",") if k]
            unknown = set(kinds) - set(KINDS)
            if unknown:
                raise SystemExit(f"--chaos-kinds: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
        elif arg == "--chaos-out":
            out = next(it)
        else:
            rest.append(arg)
    result = run(rest, kinds, seed)
    print(markdown(result["table"]))
    acc = result["summary"]["accounting"]
    print(f"episodes started {acc['started']} = trained {acc['trained']} + dropped {acc['dropped']}; "
          f"balanced: {acc['balanced']}; run folder {result['run_dir']}")
    if out:
        with open(out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "summary"} | {"accounting": acc}, f, indent=2)
    return 0 if acc["balanced"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
