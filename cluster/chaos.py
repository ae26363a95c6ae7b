"""Chaos run: a real training run in which real processes are killed at seeded moments, and a
table of what the run did about each.

    python -m cluster.chaos [--chaos-seed 0] [--chaos-kinds chromium,env_server,worker,learner] \
        [--chaos-out FILE.json] [bgrpo train arguments: --config local --cluster.total_steps 8 ...]

Each kind is injected once, after a step chosen by the seed and a delay (0-2 s) into the next one,
so the kill lands while groups are being collected or the learner trains:
  - chromium:   SIGKILL of the top Chromium process of one env server (the server relaunches it);
  - env_server: SIGKILL of one env server process (the rollout worker's pool restarts it);
  - worker:     SIGKILL of one rollout worker's process (the driver starts a replacement);
  - learner:    SIGKILL of learner rank 0's process (the driver recovers it from a checkpoint).
The table has, per kind: how many were injected, the time to recover (from the kill to the end of
the next training step that finished after it: training made progress again), the episodes that
failed in that step (a failed episode is never trained: its group is collected again), and the
episodes dropped under the reason the kind's recovery books. The run's own books (summary.json)
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


def plan(kinds: list[str], total_steps: int, seed: int) -> list[Injection]:
    """One injection per kind, after a seeded step in [1, total_steps - 2] (so that at least one
    step follows the recovery), in a seeded order; two kinds never share a step when there is room."""
    if total_steps < 3:
        raise ValueError("a chaos run needs cluster.total_steps >= 3")
    rng = random.Random(seed)
    steps = list(range(1, total_steps - 1))
    rng.shuffle(steps)
    return [Injection(kind, steps[i % len(steps)], round(rng.uniform(0.0, MAX_DELAY_S), 2))
            for i, kind in enumerate(kinds)]


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
    """The `on_step` hook of a run: schedules each planned kill, and records when steps end."""

    injections: list[Injection]
    seed: int = 0
    step_ends: list[tuple[int, float]] = field(default_factory=list)
    _timers: list[threading.Timer] = field(default_factory=list)

    def __call__(self, trainer: Any, step: int) -> None:
        self.step_ends.append((step, time.time()))
        for inj in self.injections:
            if inj.after_step == step and not inj.at:
                timer = threading.Timer(inj.delay_s, self._inject, (trainer, inj))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()

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


def fault_table(monkey: ChaosMonkey, records: list[dict[str, Any]], dropped: dict[str, int]) -> list[dict[str, Any]]:
    """Per kind: count, seconds to recover, episodes failed in the step that recovered, and the
    episodes dropped (to be collected again) under the kind's reason. Two kinds share the
    "rerun_attempt" reason, so for those the dropped figure is the run's total for both."""
    failed_by_step = {int(r["step"]): float(r.get("episodes_failed", 0.0)) for r in records
                      if "policy_version" in r and "event" not in r}
    rows: dict[str, dict[str, Any]] = {}
    for inj in monkey.injections:
        row = rows.setdefault(inj.kind, {"kind": inj.kind, "injected": 0, "recover_s": [], "episodes_failed": 0,
                                         "dropped_reason": DROP_REASON[inj.kind],
                                         "episodes_dropped": int(dropped.get(DROP_REASON[inj.kind], 0))})
        if not inj.at:
            continue
        row["injected"] += 1
        after = [(s, t) for s, t in monkey.step_ends if t > inj.at]
        if after:
            row["recover_s"].append(round(after[0][1] - inj.at, 1))
            row["episodes_failed"] += int(failed_by_step.get(after[0][0], 0.0))
    return list(rows.values())


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
    from cluster.metrics import read_metrics

    cl = parse_cli(argv)
    monkey = ChaosMonkey(plan(kinds, cl.config.cluster.total_steps, seed), seed)
    try:
        summary = driver.train(cl.config, cl.resume or None, resume=cl.resume is not None, preset=cl.preset,
                               on_step=monkey)
    finally:
        monkey.cancel()
    run_dir = cl.config.cluster.run_dir
    table = fault_table(monkey, read_metrics(run_dir), summary["accounting"]["dropped"])
    return {"run_dir": run_dir, "summary": summary, "injections": [asdict(i) for i in monkey.injections],
            "table": table}


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
