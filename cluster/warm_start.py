"""The supervised warm start: demonstrations -> SFT in the learner ranks -> a checkpoint.

`run_warm_start` works on the learner actors of a run: `bgrpo train` calls it after start-up when
`warm_start.enabled` (then GRPO continues from the warm-started weights with a fresh optimizer
state), and `bgrpo sft` calls it on learner actors of its own and stops there. The checkpoint it
writes (`<run_dir>/sft/step-000000/model`) is a Hugging Face model folder that `model:` can name.

    bgrpo sft --config local [--warm_start.epsilon 0.3 ...] [--warm_start.demos_dir DIR]
"""

from __future__ import annotations

import copy
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cluster.config import check_teachers, warm_start_tasks

log = logging.getLogger(__name__)

SFT_DIR = "sft"
DEMOS_DIR = "demos"


def run_warm_start(
    learners: list[Any], config: Any, run_dir: str | Path, model_path: str,
    log_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Collects (or reads) demonstrations, trains every learner rank on them, moves the policy
    version once and saves a checkpoint. Returns a summary (also logged through `log_metrics`)."""
    from learner.sft import split_heldout

    ws = config.warm_start
    run_dir = Path(run_dir)
    t0 = time.monotonic()
    summary: dict[str, Any] = {"event": "warm_start"}
    groups = _demonstrations(config, run_dir, model_path, summary)
    groups = [g for g in groups if g.trainable_trajectories]
    if not groups:
        raise RuntimeError(f"warm start: no usable demonstration episode ({summary['demos']})")
    train, heldout = split_heldout(groups, ws.heldout_fraction)
    summary["demo_success_rate"] = sum(t.success for g in groups for t in g.trajectories) / len(groups)
    log.info("warm start: %d demonstration episodes (%d held out), teacher success %.2f",
             len(groups), len(heldout), summary["demo_success_rate"])
    _train_sft(learners, train, heldout, config, summary, log_metrics)
    _finish(learners, run_dir, summary)
    summary["wall_s"] = time.monotonic() - t0
    if log_metrics is not None:
        log_metrics({k: v for k, v in summary.items() if not isinstance(v, dict)})
    return summary


def _demonstrations(config: Any, run_dir: Path, model_path: str, summary: dict[str, Any]) -> list[Any]:
    """The demonstration groups: read from `warm_start.demos_dir`, or the teacher played on
    training seeds (never the held-out ones). Records where they came from in `summary["demos"]`."""
    from actors.demos import collect_demonstrations, demo_instances
    from core.trajectory import read_trajectories

    ws = config.warm_start
    if ws.demos_dir:
        groups = read_trajectories(Path(ws.demos_dir) / "trajectories")
        if not groups:
            raise FileNotFoundError(f"warm_start.demos_dir {ws.demos_dir}: no trajectories/group-*.parquet")
        summary["demos"] = {"episodes": sum(len(g.trajectories) for g in groups), "from": ws.demos_dir}
        return groups
    instances = demo_instances(warm_start_tasks(config), ws.episodes_per_task, config.sampler.train_seeds,
                               config.cluster.seed)
    groups, demo_summary = collect_demonstrations(
        model_path, instances, config.rollout, config.env, run_dir / DEMOS_DIR, ws.epsilon, ws.num_sessions,
        config.cluster.seed)
    summary["demos"] = demo_summary.as_dict()
    return groups


def _all_ranks(learners: list[Any], method: str, *args: Any) -> dict[str, float]:
    """`method(*args)` on every learner rank at once (they meet in collectives); rank 0's answer."""
    import ray

    return ray.get([getattr(lr, method).remote(*args) for lr in learners], timeout=3600)[0]


def _train_sft(
    learners: list[Any], train: list[Any], heldout: list[Any], config: Any, summary: dict[str, Any],
    log_metrics: Callable[[dict[str, Any]], None] | None,
) -> None:
    """SFT: epochs of shuffled batches on every rank, the held-out loss before and after each
    epoch; the step count and first/last training loss go into `summary`."""
    import ray

    ws = config.warm_start
    heldout_ref = ray.put(heldout) if heldout else None
    losses: list[float] = []
    if heldout_ref is not None:
        summary["heldout_loss_before"] = _all_ranks(learners, "sft_loss", heldout_ref)["sft_loss"]
    rng = random.Random(f"sft:{config.cluster.seed}")
    step = 0
    for epoch in range(ws.epochs):
        order = list(train)
        rng.shuffle(order)
        for start in range(0, len(order), ws.batch_episodes):
            metrics = _all_ranks(learners, "sft_step", ray.put(order[start:start + ws.batch_episodes]), ws.lr)
            losses.append(metrics["sft_loss"])
            step += 1
            if log_metrics is not None:
                log_metrics({"event": "sft", "sft_step": step, "epoch": epoch, **metrics})
        if heldout_ref is not None:
            held = _all_ranks(learners, "sft_loss", heldout_ref)
            summary["heldout_loss_after"] = held["sft_loss"]
            summary["heldout_token_accuracy"] = held["sft_token_accuracy"]
            if log_metrics is not None:
                log_metrics({"event": "sft_heldout", "epoch": epoch, "sft_heldout_loss": held["sft_loss"],
                             "sft_heldout_token_accuracy": held["sft_token_accuracy"]})
    summary["sft_steps"] = step
    summary["train_loss_first"] = losses[0] if losses else None
    summary["train_loss_last"] = losses[-1] if losses else None


def _finish(learners: list[Any], run_dir: Path, summary: dict[str, Any]) -> None:
    """The warm-started policy: a new version and a checkpoint `model:` can name."""
    import ray

    from learner import checkpoint as ckpt

    versions = ray.get([lr.finish_warm_start.remote() for lr in learners], timeout=600)
    paths = ray.get([lr.save_checkpoint.remote(str(run_dir / SFT_DIR), {"warm_start": True}) for lr in learners],
                    timeout=3600)
    summary["policy_version"] = versions[0]
    summary["checkpoint"] = str(Path(paths[0]) / ckpt.MODEL_DIR)


def start_learners(config: Any, model_path: str) -> list[Any]:
    """Learner actors for a standalone `bgrpo sft` (the same ranks and rendezvous as a run)."""
    import ray

    from learner.learner import LearnerActor

    learner_cfg = copy.deepcopy(config.learner)
    learner_cfg.model_path = model_path
    world = config.cluster.learner_num_ranks
    options = {"num_cpus": config.cluster.learner_num_cpus, "num_gpus": config.cluster.learner_num_gpus}
    learners = [LearnerActor.options(**options).remote(learner_cfg, rank, world) for rank in range(world)]
    if world > 1:
        addr, port = ray.get(learners[0].rendezvous_address.remote(), timeout=120)
        ray.get([lr.connect.remote(addr, port) for lr in learners], timeout=learner_cfg.dist_timeout_s)
    return learners


USAGE = """usage: bgrpo sft [--config NAME|PATH] [--SECTION.FIELD VALUE ...]

Supervised warm start: scripted-teacher demonstrations (warm_start.*; or warm_start.demos_dir),
completion-only cross-entropy in the learner ranks, a checkpoint. Prints the checkpoint's model
folder: start GRPO from it with `bgrpo train --model <that folder>`, or let `bgrpo train` do both
with --warm_start.enabled true.
"""


def main(argv: list[str] | None = None) -> int:
    import json

    from cluster.config import ConfigError, parse_cli, save_config
    from cluster.models import resolve_model
    from cluster.runenv import new_run_dir, offline_env_vars

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cl = parse_cli(argv)
        check_teachers(cl.config)
    except ConfigError as e:
        print(f"bgrpo sft: bad config: {e}", file=sys.stderr)
        return 2
    config = cl.config
    run_dir = Path(config.cluster.run_dir) if config.cluster.run_dir else new_run_dir(config, "sft")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    import ray

    owns = not ray.is_initialized()
    if owns:
        kwargs: dict[str, Any] = {"address": config.cluster.address or "local",
                                  "runtime_env": {"env_vars": offline_env_vars()}}
        if config.cluster.num_cpus and kwargs["address"] == "local":
            kwargs["num_cpus"] = config.cluster.num_cpus
        ray.init(**kwargs)
    learners: list[Any] = []
    try:
        model_path = resolve_model(config.model)
        learners = start_learners(config, model_path)
        summary = run_warm_start(learners, config, run_dir, model_path)
    finally:
        for lr in learners:
            ray.kill(lr, no_restart=True)
        if owns:
            ray.shutdown()
    (run_dir / "sft_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"bgrpo sft: demos {summary['demos']}; held-out loss {summary.get('heldout_loss_before')} -> "
          f"{summary.get('heldout_loss_after')}; checkpoint {summary['checkpoint']}", flush=True)
    return 0
