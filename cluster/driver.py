"""`bgrpo train`: the driver. Config -> Ray -> placement -> actors -> the training loop -> shutdown.

    bgrpo train --config local [--resume RUN_DIR] [--learner.lr 1e-6 ...]

One process, on the user's machine or inside `ray job submit`. It validates the whole config before
Ray starts, then `train()` reads top to bottom:

- `Fleet` (cluster/fleet.py) joins or starts Ray, reserves placement groups (cluster/placement.py)
  and starts the learner ranks, the env-server hosts (when they run as Ray actors) and the rollout
  workers; `WeightSyncWiring` (same module) moves weights learner -> workers;
- a scheduler (cluster/scheduler.py) runs the sync or async loop over `RayRollouts`: groups go from
  the workers to the learner by reference, the driver sees their metadata only;
- the books (cluster/accounting.py): every episode a worker started is either trained on or
  dropped with a counted reason (`Accounting`), checked at the end;
- a learner rank that dies: the scheduler rebuilds the learner group from the last checkpoint and
  goes on (cluster/learner_recovery.py, within `cluster.learner_restart_budget`);
- around the loop: evaluation (cluster/eval.py), checkpoints (cluster/checkpoints.py), metrics, a
  progress bar, plots, and a shutdown of everything on success, error, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from cluster import checkpoints, run_processes
from cluster.accounting import (
    Accounting, LearnerLost, Ledger, StepFigures, StepRecord, TrainingError, merge_books, settled_books,
)
from cluster.checkpoints import CHECKPOINTS
from cluster.config import (
    ConfigError,
    TrainConfig,
    help_text,
    num_generations,
    parse_cli,
    save_config,
    to_dict,
    validate_config,
)
from cluster.fleet import Fleet, RayRollouts, WeightSyncWiring
from cluster.models import resolve_model
from cluster.runenv import new_run_dir
from cluster.sampler import TaskSampler
from cluster.scheduler import AsyncScheduler, LearnerDied, Loop, Progress, StepDone, SyncScheduler

__all__ = ["Accounting", "CHECKPOINTS", "StepRecord", "Trainer", "TrainingError", "main", "resolve_model", "train"]  # old paths

log = logging.getLogger("bgrpo.driver")

SUMMARY = "summary.json"


class Trainer:
    """One run: the fleet, the books and the outputs. `start()` builds the actors, `run()` trains
    to `cluster.total_steps`, `close()` stops everything."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        resume: bool = False,
        on_step: Callable[["Trainer", int], None] | None = None,
    ) -> None:
        validate_config(config)
        self.config = config
        self.run_dir = Path(run_dir).resolve()
        self.resume = resume
        self.on_step = on_step
        """Called after every learner step (and its checkpoint): tests use it to interrupt a run."""
        self.fleet = Fleet(config, self.run_dir)
        self.processes = run_processes.RunProcesses(self.run_dir)
        """processes.json: what this run starts, for `bgrpo cleanup` after a SIGKILL (cluster/run_processes.py)."""
        self.weights = WeightSyncWiring(self.fleet)
        self.sampler = TaskSampler(config.sampler, seed=config.cluster.seed)
        self.ledger = Ledger(self.sampler, config.cluster.max_actor_failures, self._log_event,
                             restart_budget=config.cluster.worker_restart_budget,
                             restart_window_s=config.cluster.worker_restart_window_s,
                             learner_restart_budget=config.cluster.learner_restart_budget,
                             learner_restart_window_s=config.cluster.learner_restart_window_s,
                             max_failed_in_a_row=config.cluster.max_failed_groups_in_a_row)
        self.restarts_logged = 0
        """Worker restarts already in a step's `worker_restarts` figure."""
        self.learner_restarts_logged = 0
        self.progress = Progress()
        self.figures = StepFigures()
        self.group_size = num_generations(config) or 2
        self.eval_results: list[dict[str, Any]] = []
        self.eval_details: list[dict[str, Any]] = []
        """Full results of every evaluation (cluster/eval.py: per task, intervals, failures)."""
        self.warm_start: dict[str, Any] | None = None
        self.async_overlap: list[dict[str, Any]] = []
        """Async: per step, how many groups were in flight while the learner trained, and how many
        engine calls the workers made meanwhile (measured: workers are busy while it trains)."""
        # Colocated sync runs put the engines to sleep while the learner trains: vLLM only with
        # its sleep mode on (CUDA); the transformers engine can always (a no-op on CPU).
        self.engines_sleep = config.cluster.colocate and config.cluster.mode == "sync" and (
            config.engine.backend == "transformers" or bool(getattr(config.engine, "enable_sleep_mode", False)))
        self.metrics: Any = None
        self.run_index: Any = None  # runs/<run>/index.html, rewritten after every step (cluster/run_index.py)
        self.pbar: Any = None
        self.t_start = 0.0
        self.t_last_step = 0.0
        self.before: dict[str, Any] = {}
        """On resume: the run so far up to the checkpoint (its cursor's `run_so_far`), so that
        summary.json describes the whole run, not only the resumed part."""
        self.resumed_from: int | None = None
        self.loop: Loop | None = None
        """The running scheduler's loop (its `total_steps` is what `extend_run` raises)."""

    # --- views the tests and hooks read ------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def version(self) -> int:
        return self.progress.version

    @property
    def accounting(self) -> Accounting:
        return self.ledger.accounting

    @property
    def steps(self) -> list[StepRecord]:
        return self.ledger.steps

    @property
    def workers(self) -> list[Any]:
        return self.fleet.workers

    @property
    def env_hosts(self) -> list[Any]:
        return self.fleet.env_hosts

    # --- start-up -------------------------------------------------------------------------------

    def start(self) -> None:
        """Ray, the run's outputs, every actor, the weight-sync wiring, then the warm start or
        the resume (the workers at the learner's version either way)."""
        from cluster.metrics import MetricsLogger
        from cluster.run_index import RunIndex

        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:  # what a killed attempt left running goes first (`bgrpo cleanup`)
            for p in run_processes.cleanup(self.run_dir):
                log.warning("stopped pid %d, left running by an earlier attempt of this run: %s", p["pid"], p["cmdline"][:100])
        self.processes.begin()
        # Before the metrics file opens: what the killed attempt wrote after the checkpoint is superseded.
        resumed = checkpoints.supersede_after(self.run_dir, checkpoints.last_cursor(self.run_dir)) if self.resume else None
        save_config(cfg, self.run_dir / "config.yaml")
        self.fleet.init_ray()
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.cluster.run_name or self.run_dir.name, to_dict(cfg))
        if resumed is not None:
            self.metrics.log(resumed, step=resumed["from_step"])
        self.run_index = RunIndex(self.run_dir)
        self.fleet.start()
        self.processes.snapshot()
        self.weights.connect()
        if cfg.warm_start.enabled and not self.resume:
            # Supervised warm start: demonstrations -> SFT on the learner ranks -> every worker.
            from cluster.warm_start import run_warm_start

            self.warm_start = run_warm_start(self.fleet.learners, cfg, self.run_dir, self.fleet.model_path,
                                             lambda record: self.metrics.log(record, step=0))
            self.progress.version = self.weights.sync()
        if self.resume:
            # Learner state, data cursor, and the workers at the learner's version.
            cursor = checkpoints.load(self.fleet.learners, self.run_dir)
            self.progress.step = self.resumed_from = self.ledger.resume(cursor)
            self.before = cursor.get("run_so_far") or {}
            self.progress.version = self.weights.sync()
        self.t_start = time.monotonic()

    def _log_event(self, record: dict[str, Any]) -> None:
        self.metrics.log(record, step=self.progress.step)

    # --- the loop and each step -----------------------------------------------------------------

    def scheduler(self) -> SyncScheduler | AsyncScheduler:
        cfg = self.config.cluster
        self.loop = loop = Loop(RayRollouts(self.fleet, self.weights, cfg.group_timeout_s), self.ledger,
                                self.progress, cfg.total_steps, cfg.groups_per_step, self.group_size, self._on_step)
        if cfg.mode == "sync":
            return SyncScheduler(loop, self.engines_sleep)
        return AsyncScheduler(loop, cfg.max_staleness)

    def _on_step(self, done: StepDone) -> None:
        """Books, metrics, progress, checkpoint, evaluation, the test hook: the same in both loops."""
        if done.overlap is not None:
            self.async_overlap.append(done.overlap)
        self.ledger.trained(self.step, done.batch, done.learner_metrics, done.version_before)
        # Replaced workers' last counters stay in the sums (a new worker counts from 0).
        stats = self.fleet.worker_stats() + self.fleet.retired_stats
        record = self.figures.record(done, self.version, stats, self.accounting.trained,
                                     time.monotonic() - self.t_start, self.progress.learner_busy_s)
        record["worker_restarts"] = float(self.ledger.worker_restarts - self.restarts_logged)
        self.restarts_logged = self.ledger.worker_restarts
        record["learner_restarts"] = float(self.ledger.learner_restarts - self.learner_restarts_logged)
        self.learner_restarts_logged = self.ledger.learner_restarts
        self.t_last_step = time.monotonic()
        self.metrics.log(record, step=self.step)
        self.run_index.update({gid: r.step for r in self.steps for gid in r.group_ids})
        self._report(record)
        cfg = self.config
        last = self.step >= cfg.cluster.total_steps
        with self._learner_calls():
            # The evaluation first: a checkpoint of this step then carries it (`run_so_far`), and a
            # run resumed from it neither redoes nor loses it.
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and not last:
                self.evaluate()
            if (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0) or (
                last and cfg.checkpoint.save_final
            ):
                self.save_checkpoint()
        if self.on_step is not None:
            self.on_step(self, self.step)

    def extend_run(self, steps: int) -> None:
        """Raises the run's length by `steps`, from an `on_step` hook: the chaos run uses it when
        its last kill lands in the last step, so that a step books the recovery (cluster/chaos.py)."""
        self.config.cluster.total_steps += steps
        if self.loop is not None:
            self.loop.total_steps = self.config.cluster.total_steps
        if self.pbar is not None:
            self.pbar.total = self.config.cluster.total_steps
            self.pbar.refresh()

    @contextlib.contextmanager
    def _learner_calls(self) -> Iterator[None]:
        """A learner rank dead during a checkpoint or an evaluation's weight load is a LearnerDied
        (the scheduler recovers it: the checkpoint being written never became `latest`)."""
        import ray

        try:
            yield
        except ray.exceptions.RayActorError as e:
            died = self.fleet.learner_death(e)
            if died is None:
                raise
            raise died from e

    def _report(self, record: dict[str, Any]) -> None:
        """The progress bar, or a line every log_every_steps."""
        cfg = self.config
        if self.pbar is not None:
            self.pbar.set_postfix(
                v=self.version, reward=f"{record['reward_mean']:.2f}", succ=f"{record['success_rate']:.2f}",
                lag=f"{record['policy_lag_max']:.0f}",
            )
            self.pbar.update(1)
        elif self.step % cfg.logging.log_every_steps == 0:
            print(
                f"[bgrpo] step {self.step}/{cfg.cluster.total_steps} v{self.version} "
                f"reward {record['reward_mean']:.3f} success {record['success_rate']:.2f} "
                f"lag<={record['policy_lag_max']:.0f} train {record['learner_step_s']:.1f}s",
                flush=True,
            )

    def save_checkpoint(self) -> str:
        cursor = self.ledger.cursor(self.step, self.version)
        cursor["run_so_far"] = self._run_so_far(settled_books(self.accounting))
        path = checkpoints.save(self.fleet.learners, self.run_dir, cursor)
        self.metrics.log({"event": "checkpoint", "path": path}, step=self.step)
        self.processes.snapshot()  # browsers relaunched since start-up
        return path

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """The held-out seeds, greedy or sampled (cluster/eval.py, shared with `bgrpo eval`)."""
        from cluster.eval import eval_rollout, evaluate_in_run

        cfg = self.config
        worker = self.fleet.start_eval_worker(eval_rollout(cfg))
        instances = [(x.task, x.seed) for x in self.sampler.eval_instances(cfg.eval.episodes_per_task)]
        details, result = evaluate_in_run(worker, self.weights.load_into([worker]), instances, cfg.cluster.group_timeout_s,
                                          self.step, self.run_dir)
        self.accounting.eval_episodes += details["overall"]["episodes"] + details["overall"]["failures"]
        self.metrics.log(result, step=self.step)
        self.eval_results.append(result)
        self.eval_details.append(details)
        return result

    # --- the whole run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Trains to total_steps; returns the summary (also written to run_dir/summary.json)."""
        cfg = self.config
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.pbar = tqdm(total=cfg.cluster.total_steps, initial=self.step, desc=f"bgrpo {cfg.cluster.mode}",
                             unit="step", dynamic_ncols=True, file=sys.stderr)
        if cfg.eval.before_training and self.step == 0:
            self.evaluate()
        try:
            if self.step < cfg.cluster.total_steps:
                self.scheduler().run()
        finally:
            if self.pbar is not None:
                self.pbar.close()
                self.pbar = None
        if cfg.eval.at_end:
            self.evaluate()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Closes the books, checks the invariants, writes summary.json and the plots."""
        stats = self.fleet.worker_stats()
        dead = [f"w{i}" for i, s in enumerate(stats) if s.get("dead")]
        if dead:  # died after its last group: nothing re-issued it, so nothing replaced it
            raise TrainingError(f"rollout workers {dead} died at the end of the run")
        worker_versions = [int(s["policy_version"]) for s in stats]
        learner_version = self.fleet.learner_version(timeout=60)
        self.accounting.finalize(sum(int(s["episodes_started"]) for s in stats))
        if any(s.get("episodes_in_flight", 0) for s in stats):
            raise TrainingError(f"episodes still in flight at the end: {stats}")
        summary = self._summary(stats, worker_versions, learner_version)
        self.metrics.log({"event": "summary", "accounting": self.accounting.as_dict(),
                          "worker_versions": worker_versions, "learner_version": learner_version}, step=self.step)
        tmp = self.run_dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        os.replace(tmp, self.run_dir / SUMMARY)
        if self.config.logging.plots:
            from cluster.plots import write_plots

            write_plots(self.run_dir)
        self.run_index.update({gid: r.step for r in self.steps for gid in r.group_ids})  # + plots, eval groups
        if not self.accounting.balanced:
            raise TrainingError(f"episode accounting does not balance: {self.accounting.as_dict()}")
        if set(worker_versions) != {learner_version}:
            raise TrainingError(f"workers ended at versions {worker_versions}, learner at {learner_version}")
        return summary

    def _summary(self, stats: list[dict[str, Any]], worker_versions: list[int], learner_version: int) -> dict[str, Any]:
        """The whole run (every attempt, when resumed); `attempts` has each attempt's own books."""
        run = self._run_so_far(self.accounting.as_dict())
        return {
            "steps": self.step,
            "learner_version": learner_version,
            "worker_versions": worker_versions,
            "accounting": merge_books([a["accounting"] for a in run["attempts"]]),
            **run,
            "learning": self._learning(run["eval_details"]),
            # env servers restarted / failed over / episodes failed for them, replaced workers' included
            **{k: sum(int(s.get(k, 0)) for s in stats + self.fleet.retired_stats)
               for k in ("env_restarts", "env_failovers", "env_failures")},
            "mode": self.config.cluster.mode,
            "max_staleness": self.config.cluster.max_staleness,
            **{k: sum(a[k] for a in run["attempts"]) for k in ("wall_s", "train_wall_s", "learner_busy_s")},
            "worker_stats": stats,  # this attempt's workers
        }

    def _run_so_far(self, books: dict[str, Any]) -> dict[str, Any]:
        """The run up to now, earlier attempts (`self.before`) included: what a checkpoint keeps for
        a resumed run's summary and what summary.json reports."""
        before, now = self.before, time.monotonic()
        attempt = {
            "resumed_from_step": self.resumed_from, "last_step": self.step, "accounting": books,
            "wall_s": now - self.t_start,
            # from the first dispatch to the last learner step: what throughput is measured over
            # (the end-of-run drain of in-flight groups and the final eval are excluded)
            "train_wall_s": (self.t_last_step or now) - self.t_start,
            "learner_busy_s": self.progress.learner_busy_s,
        }
        return {
            "trained_steps": before.get("trained_steps", []) + [dataclasses.asdict(r) for r in self.steps],
            "dropped_instances": [list(i) for i in self.ledger.dropped_before + self.accounting.dropped_instances],
            "eval": before.get("eval", []) + self.eval_results,
            "eval_details": before.get("eval_details", []) + self.eval_details,
            "warm_start": self.warm_start if self.warm_start is not None else before.get("warm_start"),
            "async_overlap": before.get("async_overlap", []) + self.async_overlap,
            "worker_restarts": before.get("worker_restarts", 0) + self.ledger.worker_restarts,
            "learner_restarts": before.get("learner_restarts", 0) + self.ledger.learner_restarts,
            "learner_recoveries": before.get("learner_recoveries", []) + self.ledger.learner_recoveries,
            "attempts": before.get("attempts", []) + [attempt],
        }

    def _learning(self, eval_details: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Held-out success of the first evaluation (before training) vs the last, same seeds."""
        if not (self.config.eval.before_training and len(eval_details) >= 2):
            return None
        from cluster.eval import compare

        return compare(eval_details[0], eval_details[-1])

    def close(self) -> None:
        """Stops every actor, server and browser (`Fleet.close`) and the metrics. Safe twice."""
        self.fleet.close()
        self.processes.end()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    preset: str = "local",
    on_step: Callable[[Trainer, int], None] | None = None,
) -> dict[str, Any]:
    """Runs a whole training run and shuts everything down, whatever happens."""
    run_dir = Path(run_dir) if run_dir else new_run_dir(config, preset)
    config.cluster.run_dir = str(run_dir)
    trainer = Trainer(config, run_dir, resume=resume, on_step=on_step)
    try:
        trainer.start()
        return trainer.run()
    finally:
        trainer.close()


def _one_line_failure(error: BaseException, run_dir: str) -> str | None:
    """The line `bgrpo train` prints for a failure users meet without a bug in the code: a
    placement that cannot fit, a learner rank that died and was not recovered in the run
    (learner restart budget used up, NCCL weight sync), or another actor that died and is not
    replaced. None for anything else (the traceback then says where the bug is)."""
    import ray.exceptions

    from cluster.placement import PlacementError

    if isinstance(error, PlacementError):
        return f"bgrpo train: {error}"
    if isinstance(error, (LearnerLost, LearnerDied)):  # not recovered in the run (budget, NCCL, failed restart)
        return (f"bgrpo train: {error}; the run folder is {run_dir}; "
                f"continue from its last checkpoint with: bgrpo train --resume {run_dir}")
    if isinstance(error, ray.exceptions.RayActorError):
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return (f"bgrpo train: an actor died and the run cannot go on ({cause}); the run folder is {run_dir}; "
                f"continue from its last checkpoint with: bgrpo train --resume {run_dir}")
    return None


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


USAGE = """usage: bgrpo train [--config NAME|PATH] [--resume RUN_DIR] [--dry-run] [--SECTION.FIELD VALUE ...]

Train a policy with GRPO on BrowserGym tasks: locally (starts a fresh Ray) or inside `ray job submit`.
Presets: a name in cluster/presets/ (local, gpu-smoke, ...) or a path. --dry-run validates and prints the
resolved configuration (derived fields included) as YAML, then exits without starting Ray.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # --- config first: a bad one fails here, before Ray or any actor starts ---
    try:
        cl = parse_cli(argv)
    except ConfigError as e:
        print(f"bgrpo train: bad config: {e}", file=sys.stderr)
        return 2
    if cl.help:
        print(USAGE)
        print(help_text())
        return 0
    for note in cl.notes:  # on --resume: an ignored --config, the fields changed from the run's own
        print(f"bgrpo train: {note}", file=sys.stderr, flush=True)
    if cl.dry_run:  # validated above; nothing starts
        from cluster.config import resolved_yaml

        print(resolved_yaml(cl.config), end="")
        return 0
    # SIGTERM (ray job stop, kill) takes the same clean path as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        summary = train(cl.config, cl.resume or None, resume=cl.resume is not None, preset=cl.preset)
    except KeyboardInterrupt:
        print("bgrpo train: interrupted; every actor, server and browser was stopped", file=sys.stderr)
        return 130
    except (TrainingError, ConfigError) as e:
        print(f"bgrpo train: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. PlacementError: one clear line, the traceback in the log
        line = _one_line_failure(e, cl.config.cluster.run_dir)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    acc = summary["accounting"]
    print(
        f"bgrpo train: done: {summary['steps']} steps, policy v{summary['learner_version']}, "
        f"episodes started {acc['started']} = trained {acc['trained']} + dropped {acc['dropped']}; "
        f"run folder {cl.config.cluster.run_dir}",
        flush=True,
    )
    if summary.get("learning"):
        from cluster.eval import format_rate

        learning = summary["learning"]
        lo, hi = learning["difference_ci95"]
        print(f"bgrpo train: held-out success {format_rate(learning['before'])} -> {format_rate(learning['after'])}; "
              f"difference {learning['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]", flush=True)
    return 0
