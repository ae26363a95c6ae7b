"""Metrics: one record per learner step, to every sink at once.

Sinks:
- `metrics.jsonl` in the run folder (always; one JSON object per line, flushed per record);
- Ray custom metrics through `ray.util.metrics` (Counter / Gauge / Histogram), so the Ray
  dashboard's metrics view and the node's Prometheus endpoint show them (names prefixed `bgrpo_`;
  Ray adds `ray_` in the Prometheus export);
- optional trackers chosen by `logging.trackers`: trackio (the seed gist's), TensorBoard, wandb
  (offline unless WANDB_MODE says otherwise), installed by the `trackers` extra. Imported lazily;
  one that is configured but not installed is a ConfigError before the run starts.

The Grafana dashboard for the Ray metrics is cluster/grafana/bgrpo_grafana_dashboard.json (made by
cluster/grafana/make_dashboard.py from these names).

A record is a flat dict of numbers keyed by the names in `RAY_METRICS` and `task/<task>/<key>` for
`PER_TASK_METRICS` (plus anything else, e.g. the learner's own `learner/...` figures, which go to
the jsonl file and the trackers).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from cluster.config import ConfigError, LoggingConfig

METRICS_FILE = "metrics.jsonl"

# record key -> (kind, description). Counters are fed the per-record increment.
RAY_METRICS: dict[str, tuple[str, str]] = {
    "episodes_started": ("counter", "Episodes started by rollout workers"),
    "episodes_finished": ("counter", "Episodes that ended normally (done or max_steps)"),
    "episodes_failed": ("counter", "Episodes lost to infrastructure failures (never scored)"),
    "episodes_trained": ("counter", "Episodes the learner trained on"),
    "episodes_dropped": ("counter", "Episodes dropped (stale, failed group, too small group)"),
    "env_steps": ("counter", "Environment steps taken"),
    "groups_trained": ("counter", "GRPO groups trained on"),
    "groups_dropped_stale": ("counter", "Groups dropped for exceeding max_staleness"),
    "trained_tokens": ("counter", "Completion tokens trained on"),
    "env_failures": ("counter", "Episodes failed for their env server (dead, hung, refused)"),
    "env_restarts": ("counter", "Env servers restarted by rollout workers (or their host actor recreated)"),
    "env_failovers": ("counter", "Sessions moved off a remote env server found down"),
    "actor_failures": ("counter", "Rollout-worker groups that raised or timed out"),
    "worker_restarts": ("counter", "Rollout workers whose actor died and were replaced"),
    "learner_restarts": ("counter", "Learner groups rebuilt from the last checkpoint after a rank died"),
    "engine_sleeps": ("counter", "Engines put to sleep while the learner trained (cluster.colocate)"),
    "success_rate": ("gauge", "Success rate of the episodes trained at this step"),
    "reward_mean": ("gauge", "Mean episode return of the episodes trained at this step"),
    "policy_version": ("gauge", "Learner policy version after this step"),
    "policy_lag_max": ("gauge", "Largest (learner version - token version) in this step's batch"),
    "policy_lag_mean": ("gauge", "Mean (learner version - token version) in this step's batch"),
    "tokens_per_s": ("gauge", "Trained completion tokens per second of wall time"),
    "samples_per_s": ("gauge", "Trained episodes per second of wall time"),
    "learner_idle_frac": ("gauge", "Fraction of wall time the learner waited for data"),
    "eval_success_rate": ("gauge", "Greedy success rate on held-out seeds (all tasks)"),
    "learner_step_s": ("histogram", "Seconds per learner step (train_step call)"),
    "weight_sync_s": ("histogram", "Seconds to publish weights and load them on every engine"),
    "collect_s": ("histogram", "Seconds the driver waited for this step's groups"),
}
# Per-task figures of a step: record keys `task/<task>/<key>` -> the gauge `bgrpo_task_<key>` with a
# `task` tag (one series per task on the dashboard).
PER_TASK_METRICS: dict[str, str] = {
    "success_rate": "Success rate per task of the episodes trained at this step",
    "reward_mean": "Mean episode return per task of the episodes trained at this step",
}
_HISTOGRAM_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]

TRACKERS = {"trackio": "trackio", "tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers_installed(config: LoggingConfig) -> None:
    """ConfigError naming the missing package for every configured tracker that is not installed."""
    missing = [t for t in config.trackers if importlib.util.find_spec(TRACKERS.get(t, t)) is None]
    if missing:
        raise ConfigError(
            f"logging.trackers {missing} configured but not installed; `pip install {' '.join(missing)}` "
            "or remove them from logging.trackers"
        )


class RayMetrics:
    """The Ray custom metrics. Create in a process connected to Ray (the driver)."""

    def __init__(self, run_name: str) -> None:
        from ray.util import metrics as ray_metrics

        self.tags = {"run": run_name}
        self._metrics: dict[str, Any] = {}
        for key, (kind, description) in RAY_METRICS.items():
            name = f"bgrpo_{key}"
            if kind == "counter":
                m = ray_metrics.Counter(name, description=description, tag_keys=("run",))
            elif kind == "gauge":
                m = ray_metrics.Gauge(name, description=description, tag_keys=("run",))
            else:
                m = ray_metrics.Histogram(
                    name, description=description, boundaries=_HISTOGRAM_BOUNDARIES, tag_keys=("run",)
                )
            m.set_default_tags(self.tags)
            if kind == "counter":
                # A counter never incremented is absent from the Prometheus export, so a healthy run
                # would show "No data" for its failure counters. Ray's public inc() refuses 0; its
                # _record(0) puts the series at 0 from the start.
                m._record(0.0, tags=self.tags)
            self._metrics[key] = (kind, m)
        self._per_task = ray_metrics.Gauge(
            "bgrpo_eval_task_success_rate", description="Greedy success rate per task", tag_keys=("run", "task")
        )
        self._train_per_task = {
            key: ray_metrics.Gauge(f"bgrpo_task_{key}", description=description, tag_keys=("run", "task"))
            for key, description in PER_TASK_METRICS.items()
        }

    def record(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            entry = self._metrics.get(key)
            if entry is None or not _is_number(value):
                continue
            kind, m = entry
            if kind == "counter":
                if value > 0:
                    m.inc(float(value))
            elif kind == "gauge":
                m.set(float(value))
            else:
                m.observe(float(value))
        for key, value in values.items():
            if key.startswith("eval/") and key.endswith("/success_rate") and _is_number(value):
                task = key[len("eval/"):-len("/success_rate")]
                self._per_task.set(float(value), tags={**self.tags, "task": task})
            elif key.startswith("task/") and _is_number(value):
                task, _, name = key[len("task/"):].rpartition("/")
                if name in self._train_per_task and task:
                    self._train_per_task[name].set(float(value), tags={**self.tags, "task": task})


class MetricsLogger:
    """Appends records to metrics.jsonl and forwards them to Ray metrics and the trackers."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: LoggingConfig,
        run_name: str,
        run_config: Mapping[str, Any] | None = None,
        ray_metrics: bool | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")
        self.config = config
        self.ray = RayMetrics(run_name) if (config.ray_metrics if ray_metrics is None else ray_metrics) else None
        self._trackers: list[tuple[str, Any]] = []
        check_trackers_installed(config)
        for name in config.trackers:
            self._trackers.append((name, _open_tracker(name, config.project, run_name, self.run_dir, run_config or {})))

    def log(self, record: Mapping[str, Any], step: int | None = None) -> dict[str, Any]:
        """Writes one record (numbers, strings; NaN/inf become null in the file)."""
        row = {"time": time.time(), **({"step": step} if step is not None else {}), **record}
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._file.flush()
        if self.ray is not None:
            self.ray.record(record)
        numbers = {k: float(v) for k, v in record.items() if _is_number(v)}
        if not numbers:  # an event without figures (a checkpoint path): nothing to plot
            return row
        for name, tracker in self._trackers:
            if name == "trackio" or name == "wandb":
                tracker.log(numbers, step=step)
            elif name == "tensorboard":
                for k, v in numbers.items():
                    tracker.add_scalar(k, v, global_step=step)
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        for name, tracker in self._trackers:
            try:
                if name == "tensorboard":
                    tracker.close()
                else:
                    tracker.finish()
            except Exception as e:  # a tracker failing at exit must not hide the run's outcome
                print(f"[metrics] closing {name} failed: {e}")
        self._trackers.clear()


def per_task_figures(groups: Iterable[Any]) -> dict[str, float]:
    """`task/<task>/success_rate` and `task/<task>/reward_mean` over the trainable episodes of a
    step's groups (one gauge series per task on the Ray dashboard). The driver passes the groups'
    metadata (`core.group_meta.GroupMeta`); whole `TrajectoryGroup`s are summarized first."""
    from core.group_meta import as_meta

    by_task: dict[str, list[Any]] = {}
    for g in map(as_meta, groups):
        by_task.setdefault(g.task, []).extend(g.trainable_episodes)
    out: dict[str, float] = {}
    for task, episodes in sorted(by_task.items()):
        if episodes:
            out[f"task/{task}/success_rate"] = sum(t.success for t in episodes) / len(episodes)
            out[f"task/{task}/reward_mean"] = sum(t.episode_return for t in episodes) / len(episodes)
    return out


SUPERSEDED = "superseded"
"""Set (true) on the records a killed attempt wrote after the checkpoint a resumed run continued
from: the resumed run does those steps again, so the run folder describes each step once."""


def read_metrics(run_dir: str | os.PathLike, superseded: bool = False) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl (a torn last line, from a killed run, is skipped),
    without the superseded ones unless asked for."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if superseded or not row.get(SUPERSEDED):
            rows.append(row)
    return rows


def mark_superseded(run_dir: str | os.PathLike, after_step: int) -> int:
    """Marks the records of steps after `after_step` superseded (a resume from that step's checkpoint,
    before its metrics logger opens the file); torn lines are dropped. Returns how many it marked."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines, marked = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not row.get(SUPERSEDED) and _is_number(row.get("step")) and row["step"] > after_step:
            row[SUPERSEDED] = True
            marked += 1
        lines.append(json.dumps(row) + "\n")
    tmp = path.with_name(f".{METRICS_FILE}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return marked


def _open_tracker(name: str, project: str, run_name: str, run_dir: Path, run_config: Mapping[str, Any]) -> Any:
    if name == "trackio":
        import trackio

        trackio.init(project=project, name=run_name, config=dict(run_config))
        return trackio
    if name == "wandb":
        import wandb

        # Offline unless WANDB_MODE says otherwise: the run is written under run_dir/wandb and
        # `wandb sync run_dir/wandb/offline-run-*` uploads it later (clusters often have no egress).
        mode = os.environ.get("WANDB_MODE", "offline")
        return wandb.init(project=project, name=run_name, config=dict(run_config), dir=str(run_dir), mode=mode)
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    raise ConfigError(f"unknown tracker {name!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):  # numpy / torch scalars
        try:
            return _jsonable(v.item())
        except Exception:
            return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)
