"""`bgrpo train`: the driver. Config -> Ray -> placement -> actors -> the training loop -> shutdown.

    bgrpo train --config local [--resume RUN_DIR] [--learner.lr 1e-6 ...]

One process, on the user's machine or inside `ray job submit`. It validates the whole config before
Ray starts, joins or starts Ray, reserves placement groups (cluster/placement.py), starts the
learner ranks, the env-server hosts (when they run as Ray actors) and the rollout workers, then runs
one of two loops:

- sync: sample `groups_per_step` instances, collect them all with policy v, train, publish v+1,
  and every worker loads v+1 before it samples again (on-policy);
- async: every worker always has a group in flight; finished groups enter a buffer; the learner
  trains whenever the buffer holds a batch, on groups whose oldest token is at most
  `max_staleness` versions behind it (older ones are dropped and counted), and new weights go to
  the workers while they keep sampling (they switch at a step boundary; each step records its
  version).

Around the loop: periodic greedy evaluation on held-out seeds, checkpoints with the data cursor,
metrics (metrics.jsonl, Ray custom metrics, trackers), a progress bar, plots at the end, and a
shutdown of every actor, server and browser on success, error, Ctrl-C and SIGTERM.

Episode accounting, checked at the end: every episode a worker started is either trained on or
dropped with a counted reason (`Accounting`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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

log = logging.getLogger("bgrpo.driver")

CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"


class TrainingError(RuntimeError):
    """The run cannot continue (too many actor failures, a broken invariant)."""


# --- accounting ------------------------------------------------------------------------------------


@dataclass
class Accounting:
    """Episodes of this process's run: started (reported by the workers) = trained + dropped[reason]
    + in flight. Reasons:
    - rerun_attempt: episodes of group attempts a worker re-ran after an infrastructure failure;
    - failed_group: groups returned with failed episodes (reruns used up) are not trained;
    - stale: groups older than max_staleness when the learner would take them;
    - learner_filtered: dropped by the learner (failed episodes, groups below min_group_size,
      zero-variance groups when configured);
    - run_ended: groups that finished after the last learner step (async in-flight, sync spares).
    """

    started: int = 0
    trained: int = 0
    returned: int = 0
    """Episodes in groups returned to the driver by run_group."""
    dropped: Counter = field(default_factory=Counter)
    groups_trained: int = 0
    groups_dropped: Counter = field(default_factory=Counter)
    eval_episodes: int = 0
    dropped_instances: list[tuple[str, int, int, str]] = field(default_factory=list)
    """(task, seed, sampler index, reason) of every dropped group, for the record of the run."""

    def drop(self, reason: str, group: Any) -> None:
        self.dropped[reason] += len(group.trajectories)
        self.groups_dropped[reason] += 1
        self.dropped_instances.append(
            (getattr(group, "task", ""), getattr(group, "seed", -1), getattr(group, "_sampler_index", -1), reason))

    def finalize(self, worker_started: int) -> None:
        """Closes the books once no group is in flight."""
        self.started = worker_started
        self.dropped["rerun_attempt"] = worker_started - self.returned

    @property
    def balanced(self) -> bool:
        return self.started == self.trained + sum(self.dropped.values()) and self.dropped["rerun_attempt"] >= 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "trained": self.trained,
            "returned": self.returned,
            "dropped": dict(self.dropped),
            "groups_trained": self.groups_trained,
            "groups_dropped": dict(self.groups_dropped),
            "eval_episodes": self.eval_episodes,
            "balanced": self.balanced,
        }


@dataclass
class StepRecord:
    """What the learner trained at one step (kept for the run summary and the tests)."""

    step: int
    learner_version: int
    """Learner version when it trained (the new weights are learner_version + 1)."""
    group_ids: list[str]
    instances: list[tuple[str, int, int]]
    """(task, seed, sampler index) of each trained group."""
    min_token_version: int
    max_token_version: int


# --- resolving models -----------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """'tiny-vlm' / 'tiny-lm' -> the folder of the tiny model built offline; 'random-qwen3-vl-2b'
    -> a random-initialised model of Qwen3-VL-2B's exact shape, built offline (GPU smoke runs and
    benchmarks: the real sizes without a download); else as given."""
    if name == "random-qwen3-vl-2b":
        from actors.tiny_models import build_qwen3_vl_2b_shape

        return str(build_qwen3_vl_2b_shape())
    if name in ("tiny-vlm", "tiny-vl"):
        from actors.tiny_models import build_tiny_vl_model

        return str(build_tiny_vl_model())
    if name in ("smollm2-135m", "SmolLM2-135M-Instruct"):
        from actors.smollm2 import build_smollm2

        return str(build_smollm2())
    if name in ("tiny-lm", "tiny-text"):
        from actors.tiny_models import build_tiny_text_model

        return str(build_tiny_text_model())
    return name


def _new_run_dir(config: TrainConfig, preset: str) -> Path:
    if config.cluster.run_dir:
        return Path(config.cluster.run_dir)
    name = config.cluster.run_name or Path(preset).stem
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


# --- the trainer ----------------------------------------------------------------------------------


class Trainer:
    """Owns the actors of one run. `run()` trains to `cluster.total_steps`; `close()` stops all."""

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
        self.accounting = Accounting()
        self.steps: list[StepRecord] = []
        self.eval_results: list[dict[str, Any]] = []
        self.eval_details: list[dict[str, Any]] = []
        """Full results of every evaluation (cluster/eval.py: per task, intervals, failures)."""
        self.warm_start: dict[str, Any] | None = None
        self.step = 0
        self.version = 0
        self.owns_ray = False
        # Colocated sync runs put the engines to sleep while the learner trains: vLLM only with
        # its sleep mode on (CUDA); the transformers engine can always (a no-op on CPU).
        self._engines_sleep = config.cluster.colocate and config.cluster.mode == "sync" and (
            config.engine.backend == "transformers" or bool(getattr(config.engine, "enable_sleep_mode", False)))
        self.placement = None
        self.learners: list[Any] = []
        self.workers: list[Any] = []
        self.env_hosts: list[Any] = []
        self.eval_worker: Any = None
        self.metrics = None
        self.run_index = None  # runs/<run>/index.html, rewritten after every step (cluster/run_index.py)
        self.sampler = None
        self.actor_failures = 0
        self.learner_busy_s = 0.0
        self.t_start = 0.0
        self.async_overlap: list[dict[str, Any]] = []
        """Async: per step, how many groups were in flight while the learner trained, and how many
        engine calls the workers made meanwhile (measured: workers are busy while it trains)."""
        self._prev_stats: dict[str, float] = {}
        self.weight_sync: Any = None
        """The driver's `weightsync.WeightSync` (cluster.weight_sync): one call per sync."""
        self.t_last_step = 0.0

    # --- start-up -------------------------------------------------------------------------------

    def start(self) -> None:
        import ray

        from cluster.metrics import MetricsLogger
        from cluster.placement import Placement
        from cluster.run_index import RunIndex
        from cluster.sampler import TaskSampler

        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")

        # --- Ray: a fresh local cluster, or the one we were submitted to ---
        if not ray.is_initialized():
            address = cfg.cluster.address or ("auto" if os.environ.get("RAY_ADDRESS") else "local")
            kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
            if address == "local":
                if cfg.cluster.num_cpus:
                    kwargs["num_cpus"] = cfg.cluster.num_cpus
                kwargs["runtime_env"] = {"env_vars": _offline_env_vars()}
            ray.init(**kwargs)
            self.owns_ray = True
        log.info("Ray: %s", ray.cluster_resources())

        self.metrics = MetricsLogger(
            self.run_dir, cfg.logging, cfg.cluster.run_name or self.run_dir.name, to_dict(cfg)
        )
        self.run_index = RunIndex(self.run_dir)
        self.sampler = TaskSampler(cfg.sampler, seed=cfg.cluster.seed)
        model_path = resolve_model(cfg.model)

        # --- placement, then learner ranks ---
        # The evaluation worker (greedy, its own engine) needs what a rollout worker needs.
        eval_on = bool(cfg.eval.every_steps or cfg.eval.at_end)
        eval_env_cpus = cfg.cluster.env_server_num_cpus if eval_on and cfg.cluster.env_placement == "ray_actors" else 0.0
        self.placement = Placement.create(cfg.cluster, eval_gpus=cfg.cluster.rollout_num_gpus if eval_on else 0.0,
                                          eval_cpus=eval_env_cpus)
        from learner.learner import LearnerActor

        learner_cfg = copy.deepcopy(cfg.learner)
        learner_cfg.model_path = model_path
        world = cfg.cluster.learner_num_ranks
        self.learners = [
            LearnerActor.options(**_drop_none(self.placement.learner_options(rank))).remote(learner_cfg, rank, world)
            for rank in range(world)
        ]
        if world > 1:
            addr, port = ray.get(self.learners[0].rendezvous_address.remote(), timeout=120)
            ray.get([lr.connect.remote(addr, port) for lr in self.learners], timeout=learner_cfg.dist_timeout_s)

        # --- env servers as CPU-only actors (cluster), else embedded in each worker ---
        env_urls: list[list[str] | None] = [None] * cfg.cluster.num_rollout_workers
        if cfg.cluster.env_placement == "ray_actors":
            from cluster.env_hosts import EnvServerHostActor

            # One node: loopback only. Several: the host node's IP, so other nodes' workers reach it.
            single_node = self._single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
            self.env_hosts = [
                EnvServerHostActor.options(**self.placement.env_host_options()).remote(
                    cfg.cluster.env_servers_per_worker, cfg.env, "127.0.0.1" if single_node else None
                )
                for _ in range(cfg.cluster.num_rollout_workers)
            ]
            env_urls = ray.get([h.urls.remote() for h in self.env_hosts], timeout=300)
        env_routing: dict[str, Any] = {}
        if cfg.cluster.env_placement == "remote":
            from cluster.placement import remote_env_servers

            env_urls, url_tasks = remote_env_servers(cfg.cluster)
            env_routing = {"env_url_tasks": url_tasks, "trust_unreported_seed": cfg.cluster.env_server_trust_seed}

        # --- rollout workers (each: one engine + its env sessions) ---
        from actors.rollout_worker import RolloutWorkerActor

        engine_cfg = copy.deepcopy(cfg.engine)
        engine_cfg.model = model_path
        self.workers = [
            RolloutWorkerActor.options(**self.placement.rollout_options(i)).remote(
                f"w{i}", cfg.rollout, engine_cfg, cfg.env, str(self.run_dir), env_urls[i], **env_routing
            )
            for i in range(cfg.cluster.num_rollout_workers)
        ]
        self._env_routing = env_routing
        self._engine_cfg = engine_cfg
        self._env_urls = env_urls
        # Construction errors (a browser that does not start, a bad model) surface here.
        ray.get([w.get_policy_version.remote() for w in self.workers], timeout=600)
        ray.get([lr.get_policy_version.remote() for lr in self.learners], timeout=600)

        # --- weight sync (cluster.weight_sync): learner rank 0 -> every worker; NCCL forms its group ---
        from weightsync import make_weight_sync

        self.weight_sync = make_weight_sync(cfg.cluster.weight_sync, self.learners[0], self.workers,
                                            timeout_s=cfg.cluster.weight_sync_timeout_s,
                                            bucket_mb=cfg.cluster.weight_sync_bucket_mb)
        self.weight_sync.setup()

        # --- supervised warm start: demonstrations -> SFT on the learner ranks -> every worker ---
        if cfg.warm_start.enabled and not self.resume:
            from cluster.warm_start import run_warm_start

            self.warm_start = run_warm_start(self.learners, cfg, self.run_dir, model_path,
                                             lambda record: self.metrics.log(record, step=0))
            self._sync_weights()

        # --- resume: learner state, data cursor, and the workers at the learner's version ---
        if self.resume:
            ckpt_root = self.run_dir / CHECKPOINTS
            if not (ckpt_root / "latest").exists():
                raise TrainingError(f"--resume {self.run_dir}: no checkpoint in {ckpt_root}")
            cursors = ray.get([lr.load_checkpoint.remote(str(ckpt_root)) for lr in self.learners], timeout=600)
            cursor = cursors[0]
            self.sampler.load_state_dict(cursor["sampler"])
            self.step = int(cursor["step"])
            self.version = ray.get(self.learners[0].get_policy_version.remote())
            self._trained_before = [tuple(x) for x in cursor.get("trained_instances", [])]
            self._dropped_before = [tuple(x) for x in cursor.get("dropped_instances", [])]
            self._sync_weights()
        else:
            self._trained_before, self._dropped_before = [], []
        self.t_start = time.monotonic()

    # --- weights --------------------------------------------------------------------------------

    def _sync_weights(self) -> float:
        """Sends the learner's weights and waits until every worker loaded them."""
        t0 = time.monotonic()
        self._wait_weights(self._send_weights())
        return time.monotonic() - t0

    def _send_weights(self) -> Any:
        """Starts sending the learner's current version to every worker without waiting."""
        return self.weight_sync.send()

    def _wait_weights(self, pending: Any) -> None:
        """Waits for a `_send_weights` to finish everywhere (weightsync.WeightSync.wait: the
        learner's error first, every worker's version checked); the driver's version moves only
        then."""
        version = self.weight_sync.wait(pending)
        if version is not None:
            self.version = version

    # --- training --------------------------------------------------------------------------------

    def _train(self, groups: list[Any]) -> dict[str, Any]:
        """One learner step on `groups` (every rank gets the same list)."""
        import ray

        t0 = time.monotonic()
        ref = ray.put(groups)  # one copy in the object store, read by every rank
        results = ray.get([lr.train_step.remote(ref) for lr in self.learners], timeout=3600)
        self.learner_busy_s += time.monotonic() - t0
        return results[0]

    def _account_trained(self, groups: list[Any], learner_metrics: dict[str, Any], version_before: int) -> StepRecord:
        used = int(learner_metrics.get("episodes", sum(len(g.trainable_trajectories) for g in groups)))
        total = sum(len(g.trajectories) for g in groups)
        self.accounting.trained += used
        self.accounting.dropped["learner_filtered"] += total - used
        self.accounting.groups_trained += len(groups)
        versions = [v for g in groups for t in g.trainable_trajectories for v in t.policy_versions]
        record = StepRecord(
            step=self.step,
            learner_version=version_before,
            group_ids=[g.group_id for g in groups],
            instances=[(g.task, g.seed, getattr(g, "_sampler_index", -1)) for g in groups],
            min_token_version=min(versions) if versions else -1,
            max_token_version=max(versions) if versions else -1,
        )
        self.steps.append(record)
        for g in groups:
            self.sampler.record(g.task, [t.success for t in g.trainable_trajectories])
            self.sampler.settle(getattr(g, "_sampler_index", -1))
        return record

    def _drop(self, reason: str, group: Any) -> None:
        """A returned group that will not be trained: counted, and settled in the sampler (a resume
        does not re-issue it)."""
        self.accounting.drop(reason, group)
        self.sampler.settle(getattr(group, "_sampler_index", -1))

    def _step_record(
        self,
        groups: list[Any],
        learner_metrics: dict[str, Any],
        version_before: int,
        collect_s: float,
        train_s: float,
        sync_s: float,
        step_wall_s: float,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        import ray

        trainable = [t for g in groups for t in g.trainable_trajectories]
        lags = [version_before - v for t in trainable for v in t.policy_versions]
        stats = ray.get([w.stats.remote() for w in self.workers], timeout=60)
        totals = {
            k: float(sum(s.get(k, 0) for s in stats))
            for k in ("episodes_started", "episodes_finished", "episodes_truncated", "episodes_failed", "steps",
                      "env_restarts", "engine_calls", "engine_sleeps", "browser_recycles")
        }
        delta = {k: v - self._prev_stats.get(k, 0.0) for k, v in totals.items()}
        self._prev_stats = totals
        wall = time.monotonic() - self.t_start
        tokens = float(learner_metrics.get("tokens", 0.0))
        record = {
            "policy_version": self.version,
            "episodes_started": delta["episodes_started"],
            "episodes_finished": delta["episodes_finished"] + delta["episodes_truncated"],
            "episodes_failed": delta["episodes_failed"],
            "episodes_trained": float(learner_metrics.get("episodes", len(trainable))),
            "episodes_dropped": 0.0,
            "env_steps": delta["steps"],
            "env_failures": delta["env_restarts"],
            "actor_failures": 0.0,
            "engine_sleeps": delta["engine_sleeps"],  # cluster.colocate: engines put to sleep this step
            "browser_recycles": delta["browser_recycles"],  # env.browser_max_episodes / _memory_mb relaunches
            "groups_trained": float(len(groups)),
            "trained_tokens": tokens,
            "success_rate": (sum(t.success for t in trainable) / len(trainable)) if trainable else 0.0,
            "reward_mean": (sum(t.episode_return for t in trainable) / len(trainable)) if trainable else 0.0,
            "policy_lag_max": float(max(lags)) if lags else 0.0,
            "policy_lag_mean": (sum(lags) / len(lags)) if lags else 0.0,
            "tokens_per_s": tokens / step_wall_s if step_wall_s > 0 else 0.0,
            "samples_per_s": self.accounting.trained / wall if wall > 0 else 0.0,
            "env_steps_per_s": totals["steps"] / wall if wall > 0 else 0.0,
            "learner_idle_frac": max(0.0, 1.0 - self.learner_busy_s / wall) if wall > 0 else 0.0,
            "learner_step_s": train_s,
            "weight_sync_s": sync_s,
            "collect_s": collect_s,
            "wall_s": wall,
            "tasks": sorted({g.task for g in groups}),
            **extra,
        }
        record.update({f"learner/{k}": v for k, v in learner_metrics.items()})
        from cluster.metrics import per_task_figures

        record.update(per_task_figures(groups))  # task/<task>/success_rate, reward_mean: per-task gauges
        return record

    def _after_step(self, record: dict[str, Any], pbar: Any) -> None:
        """Metrics, progress, checkpoint, evaluation, the test hook: the same in both loops."""
        cfg = self.config
        self.t_last_step = time.monotonic()
        self.metrics.log(record, step=self.step)
        self.run_index.update({gid: r.step for r in self.steps for gid in r.group_ids})
        if pbar is not None:
            pbar.set_postfix(
                v=self.version, reward=f"{record['reward_mean']:.2f}", succ=f"{record['success_rate']:.2f}",
                lag=f"{record['policy_lag_max']:.0f}",
            )
            pbar.update(1)
        elif self.step % cfg.logging.log_every_steps == 0:
            print(
                f"[bgrpo] step {self.step}/{cfg.cluster.total_steps} v{self.version} "
                f"reward {record['reward_mean']:.3f} success {record['success_rate']:.2f} "
                f"lag<={record['policy_lag_max']:.0f} train {record['learner_step_s']:.1f}s",
                flush=True,
            )
        last = self.step >= cfg.cluster.total_steps
        if (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0) or (
            last and cfg.checkpoint.save_final
        ):
            self.save_checkpoint()
        if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and not last:
            self.evaluate()
        if self.on_step is not None:
            self.on_step(self, self.step)

    def save_checkpoint(self) -> str:
        import ray

        cursor = {
            "sampler": self.sampler.state_dict(),
            "step": self.step,
            "policy_version": self.version,
            "trained_instances": [list(i) for r in self.steps for i in r.instances] + [list(i) for i in self._trained_before],
            "dropped_instances": [list(i) for i in self._dropped_before + self.accounting.dropped_instances],
            # Handed out, not yet trained or dropped (async: in flight or buffered): re-issued on --resume.
            "unsettled_instances": [[i.task, i.seed, i.index] for i in self.sampler.unsettled()],
        }
        paths = ray.get(
            [lr.save_checkpoint.remote(str(self.run_dir / CHECKPOINTS), cursor) for lr in self.learners], timeout=1800
        )
        self.metrics.log({"event": "checkpoint", "path": paths[0]}, step=self.step)
        return paths[0]

    # --- the two loops ----------------------------------------------------------------------------

    def _dispatch(self, worker_index: int) -> tuple[Any, Any]:
        """Sends the sampler's next instance to a worker; returns (ref, instance)."""
        inst = self.sampler.next()
        ref = self.workers[worker_index].run_group.remote(inst.task, inst.seed, self.G)
        return ref, inst

    def _receive(self, ref: Any, inst: Any) -> Any | None:
        """The group of a finished run_group call, or None (worker failure, counted)."""
        import ray
        from actors.rollout_worker import group_failed

        try:
            group = ray.get(ref, timeout=self.config.cluster.group_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:
            self.actor_failures += 1
            # The group is lost with the worker: a counted drop of its instance.
            self.accounting.dropped_instances.append((inst.task, inst.seed, inst.index, "actor_failure"))
            self.sampler.settle(inst.index)
            self.metrics.log({"event": "actor_failure", "error": str(e)[:500], "actor_failures": 1.0}, step=self.step)
            if self.actor_failures > self.config.cluster.max_actor_failures:
                raise TrainingError(f"{self.actor_failures} rollout-worker failures; last: {e}") from e
            return None
        group._sampler_index = inst.index  # for the record of what was trained
        self.accounting.returned += len(group.trajectories)
        mismatch = next((t.failure_reason for t in group.trajectories if "EnvEpisodeMismatchError" in t.failure_reason), "")
        if mismatch:  # a server that runs another task or seed than asked: a setup error, not bad luck
            raise TrainingError(f"an env server started the wrong episode: {mismatch}")
        if group_failed(group):
            self._drop("failed_group", group)
            return None
        return group

    def run_sync(self, pbar: Any) -> None:
        import ray

        cfg = self.config.cluster
        while self.step < cfg.total_steps:
            # --- collect groups_per_step groups with policy v: one group per worker at a time ---
            t0 = time.monotonic()
            batch: list[Any] = []
            in_flight: dict[Any, tuple[int, Any]] = {}
            free = list(range(len(self.workers)))
            while len(batch) < cfg.groups_per_step:
                while free and len(batch) + len(in_flight) < cfg.groups_per_step:
                    i = free.pop(0)
                    ref, inst = self._dispatch(i)
                    in_flight[ref] = (i, inst)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                i, inst = in_flight.pop(done[0])
                free.append(i)
                group = self._receive(done[0], inst)
                if group is not None:
                    batch.append(group)
            collect_s = time.monotonic() - t0
            # --- train on them, then every worker loads v+1 before sampling again ---
            version_before = self.version
            t1 = time.monotonic()
            if self._engines_sleep:  # colocated: the learner gets the GPU memory while it trains
                ray.get([w.sleep_engine.remote() for w in self.workers], timeout=600)
            metrics = self._train(batch)
            if self._engines_sleep:
                ray.get([w.wake_engine.remote() for w in self.workers], timeout=600)
            train_s = time.monotonic() - t1
            sync_s = self._sync_weights()
            self.step += 1
            self._account_trained(batch, metrics, version_before)
            record = self._step_record(batch, metrics, version_before, collect_s, train_s, sync_s,
                                       time.monotonic() - t0, {"groups_dropped_stale": 0.0})
            self._after_step(record, pbar)

    def run_async(self, pbar: Any) -> None:
        import ray

        cfg = self.config.cluster
        buffer: deque[Any] = deque()
        in_flight: dict[Any, tuple[int, Any]] = {}
        for i in range(len(self.workers)):
            ref, inst = self._dispatch(i)
            in_flight[ref] = (i, inst)
        train_ref = None
        train_batch: list[Any] = []
        train_t0 = step_t0 = time.monotonic()
        version_before = self.version
        pending_updates: Any = None
        stale_this_step = 0
        calls_at_train_start = 0.0
        in_flight_at_start = 0
        wait_t0 = time.monotonic()
        collect_s = 0.0
        try:
            while self.step < cfg.total_steps:
                # --- start a learner step when a batch of fresh-enough groups is buffered ---
                if train_ref is None:
                    while buffer and self.version - buffer[0].min_policy_version > cfg.max_staleness:
                        g = buffer.popleft()
                        self._drop("stale", g)
                        stale_this_step += 1
                    if len(buffer) >= cfg.groups_per_step:
                        collect_s = time.monotonic() - wait_t0
                        train_batch = [buffer.popleft() for _ in range(cfg.groups_per_step)]
                        version_before = self.version
                        lags = [version_before - g.min_policy_version for g in train_batch]
                        assert max(lags) <= cfg.max_staleness, lags  # the filter above guarantees it
                        ref = ray.put(train_batch)
                        train_ref = [lr.train_step.remote(ref) for lr in self.learners]
                        train_t0 = time.monotonic()
                        in_flight_at_start = len(in_flight)
                        calls_at_train_start = self._engine_calls()
                # --- wait for whatever finishes first: a group or the learner ---
                waitables = list(in_flight) + (train_ref[:1] if train_ref else [])
                done, _ = ray.wait(waitables, num_returns=1)
                ready = done[0]
                if train_ref and ready == train_ref[0]:
                    metrics = ray.get(train_ref, timeout=3600)[0]
                    train_s = time.monotonic() - train_t0
                    self.learner_busy_s += train_s
                    train_ref = None
                    overlap = {
                        "rollout_in_flight_during_train": float(min(in_flight_at_start, len(in_flight))),
                        "engine_calls_during_train": self._engine_calls() - calls_at_train_start,
                    }
                    self.async_overlap.append(overlap)
                    # --- publish v+1; workers load it between engine batches, without stopping ---
                    t2 = time.monotonic()
                    self._wait_weights(pending_updates)  # the previous version reached everyone
                    pending_updates = self._send_weights()
                    # Groups sampled from here on may carry the new version; staleness counts it.
                    self.version = pending_updates.version
                    sync_s = time.monotonic() - t2
                    self.step += 1
                    self._account_trained(train_batch, metrics, version_before)
                    record = self._step_record(
                        train_batch, metrics, version_before, collect_s, train_s, sync_s,
                        time.monotonic() - step_t0,
                        {"groups_dropped_stale": float(stale_this_step), **overlap},
                    )
                    stale_this_step = 0
                    step_t0 = wait_t0 = time.monotonic()
                    self._after_step(record, pbar)
                    continue
                # --- a group finished: the worker gets its next instance at once ---
                i, inst = in_flight.pop(ready)
                group = self._receive(ready, inst)
                ref, nxt = self._dispatch(i)
                in_flight[ref] = (i, nxt)
                if group is None:
                    continue
                if self.version - group.min_policy_version > cfg.max_staleness:
                    self._drop("stale", group)
                    stale_this_step += 1
                else:
                    buffer.append(group)
            self._wait_weights(pending_updates)
        except BaseException:
            in_flight.clear()  # an error or Ctrl-C: close() stops the workers, nothing to wait for
            raise
        # --- drain: groups still in flight finish and are counted as run_ended ---
        self._drain(in_flight, buffer)

    def _drain(self, in_flight: dict[Any, tuple[int, Any]], buffer: deque) -> None:
        import ray

        for g in buffer:
            self._drop("run_ended", g)
        buffer.clear()
        for ref, (i, inst) in list(in_flight.items()):
            try:
                group = ray.get(ref, timeout=self.config.cluster.group_timeout_s)
            except Exception:  # noqa: BLE001 - the worker died at the end: its episodes are in its stats
                self.accounting.dropped_instances.append((inst.task, inst.seed, inst.index, "actor_failure"))
                continue
            group._sampler_index = inst.index
            self.accounting.returned += len(group.trajectories)
            self._drop("run_ended", group)
        in_flight.clear()

    def _engine_calls(self) -> float:
        import ray

        stats = ray.get([w.stats.remote() for w in self.workers], timeout=60)
        return float(sum(s.get("engine_calls", 0) for s in stats))

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """The held-out seeds, greedy or sampled (cluster/eval.py, shared with `bgrpo eval`)."""
        from actors.rollout_worker import RolloutWorkerActor
        from cluster.eval import evaluate, eval_sessions, metrics_record, ray_runner, write_json

        cfg = self.config
        if self.eval_worker is None:
            # A dedicated worker with greedy sampling (run_group has no per-call sampling), writing
            # its trajectories under run_dir/eval so they never mix with training data.
            rollout = copy.deepcopy(cfg.rollout)
            if cfg.eval.greedy:
                rollout.sampling = dataclasses.replace(rollout.sampling, temperature=0.0, top_k=-1, top_p=1.0)
            rollout.num_sessions = eval_sessions(cfg)
            # Its own GPU share when engines use GPUs (a vLLM engine needs a visible GPU); counted
            # in the resource check at start-up.
            self.eval_worker = RolloutWorkerActor.options(num_cpus=0, num_gpus=cfg.cluster.rollout_num_gpus).remote(
                "eval", rollout, self._engine_cfg, cfg.env, str(self.run_dir / "eval"), self._eval_env_urls(),
                **self._env_routing,
            )
        version = self.weight_sync.load_into([self.eval_worker])
        instances = [(x.task, x.seed) for x in self.sampler.eval_instances(cfg.eval.episodes_per_task)]
        details = evaluate(ray_runner(self.eval_worker, cfg.cluster.group_timeout_s), instances, version)
        details["step"] = self.step
        self.accounting.eval_episodes += details["overall"]["episodes"] + details["overall"]["failures"]
        write_json(details, self.run_dir / "eval" / f"eval-step{self.step:06d}.json")
        result = metrics_record(details)
        if result["eval_status"] != "ok":
            log.warning("evaluation at step %d FAILED: %d of %d episodes failed (%s); no success rate is reported",
                        self.step, result["eval_episodes_failed"], result["eval_episodes"], result["eval_failure_reasons"])
        self.metrics.log(result, step=self.step)
        self.eval_results.append(result)
        self.eval_details.append(details)
        return result

    def _eval_env_urls(self) -> list[str] | None:
        """The evaluation worker's env servers: capacity of its own, never a session on the training
        workers' servers. In the qwen3-vl-2b-miniwob layout every session those servers accept is
        taken (rollout.num_sessions = env_servers_per_worker x env.max_sessions), so sharing them got
        every evaluation session refused. Embedded: None, the eval worker starts its own server.
        Ray actors: one more env-server host, for evaluation only (its CPU is counted at start-up).
        Remote: the configured servers, which need a session of headroom for evaluation; when they
        have none the evaluation is reported as failed (`cluster.eval.metrics_record`)."""
        import ray

        cfg = self.config
        if cfg.cluster.env_placement == "embedded":
            return None
        if cfg.cluster.env_placement == "ray_actors":
            from cluster.env_hosts import EnvServerHostActor

            host = EnvServerHostActor.options(**self.placement.env_host_options(num_servers=1)).remote(
                1, cfg.env, "127.0.0.1" if getattr(self, "_single_node", True) else None
            )
            self.env_hosts.append(host)
            return ray.get(host.urls.remote(), timeout=300)
        return list(cfg.cluster.env_server_urls)

    # --- the whole run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Trains to total_steps; returns the summary (also written to run_dir/summary.json)."""
        cfg = self.config
        self.G = num_generations(cfg) or 2
        pbar = None
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            pbar = tqdm(total=cfg.cluster.total_steps, initial=self.step, desc=f"bgrpo {cfg.cluster.mode}",
                        unit="step", dynamic_ncols=True, file=sys.stderr)
        if cfg.eval.before_training and self.step == 0:
            self.evaluate()
        try:
            if self.step < cfg.cluster.total_steps:
                (self.run_sync if cfg.cluster.mode == "sync" else self.run_async)(pbar)
        finally:
            if pbar is not None:
                pbar.close()
        if cfg.eval.at_end:
            self.evaluate()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Closes the books, checks the invariants, writes summary.json and the plots."""
        import ray

        stats = ray.get([w.stats.remote() for w in self.workers], timeout=60)
        worker_versions = [int(s["policy_version"]) for s in stats]
        learner_version = ray.get(self.learners[0].get_policy_version.remote(), timeout=60)
        self.accounting.finalize(sum(int(s["episodes_started"]) for s in stats))
        if any(s.get("episodes_in_flight", 0) for s in stats):
            raise TrainingError(f"episodes still in flight at the end: {stats}")
        summary = {
            "steps": self.step,
            "learner_version": learner_version,
            "worker_versions": worker_versions,
            "accounting": self.accounting.as_dict(),
            "trained_steps": [dataclasses.asdict(r) for r in self.steps],
            "trained_before_resume": [list(i) for i in self._trained_before],
            "dropped_instances": [list(i) for i in self.accounting.dropped_instances],
            "dropped_before_resume": [list(i) for i in self._dropped_before],
            "eval": self.eval_results,
            "eval_details": self.eval_details,
            "warm_start": self.warm_start,
            "learning": self._learning(),
            "async_overlap": self.async_overlap,
            "mode": self.config.cluster.mode,
            "max_staleness": self.config.cluster.max_staleness,
            "wall_s": time.monotonic() - self.t_start,
            # from the first dispatch to the last learner step: what throughput is measured over
            # (the end-of-run drain of in-flight groups and the final eval are excluded)
            "train_wall_s": (self.t_last_step or time.monotonic()) - self.t_start,
            "learner_busy_s": self.learner_busy_s,
            "worker_stats": stats,
        }
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

    def _learning(self) -> dict[str, Any] | None:
        """Held-out success of the first evaluation (before training) vs the last, same seeds."""
        if not (self.config.eval.before_training and len(self.eval_details) >= 2):
            return None
        from cluster.eval import compare

        return compare(self.eval_details[0], self.eval_details[-1])

    # --- shutdown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops every actor (workers close their engines, env servers and browsers), removes the
        placement groups and, if this process started Ray, shuts Ray down. Safe to call twice."""
        try:
            import ray
        except ImportError:
            return
        if ray.is_initialized():
            timeout = self.config.cluster.shutdown_timeout_s
            actors = [a for a in [*self.workers, self.eval_worker, *self.env_hosts, *self.learners] if a is not None]
            refs = []
            for a in actors:
                try:
                    refs.append(a.close.remote())
                except Exception:  # noqa: BLE001 - a dead actor has nothing to close
                    pass
            if refs:
                try:
                    ray.wait(refs, num_returns=len(refs), timeout=timeout)
                except Exception as e:  # noqa: BLE001
                    log.warning("closing actors: %s", e)
            for a in actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            if self.placement is not None:
                self.placement.remove()
        self.workers, self.learners, self.env_hosts, self.eval_worker, self.placement = [], [], [], None, None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
            self.owns_ray = False


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    preset: str = "local",
    on_step: Callable[[Trainer, int], None] | None = None,
) -> dict[str, Any]:
    """Runs a whole training run and shuts everything down, whatever happens."""
    run_dir = Path(run_dir) if run_dir else _new_run_dir(config, preset)
    config.cluster.run_dir = str(run_dir)
    trainer = Trainer(config, run_dir, resume=resume, on_step=on_step)
    try:
        trainer.start()
        return trainer.run()
    finally:
        trainer.close()


def _offline_env_vars() -> dict[str, str]:
    keep = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "BGRPO_CACHE_DIR", "BGRPO_CHROMIUM",
            "VLLM_CPU_KVCACHE_SPACE", "HF_HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _drop_none(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


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
        from cluster.placement import PlacementError

        if not isinstance(e, PlacementError):
            raise
        print(f"bgrpo train: {e}", file=sys.stderr)
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
