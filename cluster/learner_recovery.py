"""A dead learner rank, recovered inside the run: the learner group is rebuilt at the run's last
checkpoint and the engines get its weights under a version newer than any they have seen.

Called by `cluster.fleet.RayRollouts.restart_learner` when `cluster.scheduler.Loop.recover_learner`
has taken a restart from `cluster.learner_restart_budget`. What it restores from, newest first:

- the run's latest checkpoint (run_dir/checkpoints, the same `checkpoints.load` as `--resume`):
  model, optimizer, scheduler, RNG, step and policy version;
- before the first checkpoint, the warm start's checkpoint (run_dir/sft: the warm-started weights
  at step 0 with a fresh GRPO optimizer, what the run started training from);
- with neither, the initial model at step 0: a new learner is exactly the run's starting state
  (the configured model and seed), so nothing is lost that a checkpoint would have kept.

Versions: a learner's policy version is its step plus an offset (1 after a warm start). After a
recovery the learner is at the checkpoint's step and version, but the engines may hold newer
versions (sent after the checkpoint). The recovered learner then moves its version counter to the
highest version ever sent + 1 (`Learner.advance_policy_version`) and publishes the checkpoint's
weights under it, so every engine's version only goes up; from there each step adds 1 again (the
offset grows by the versions skipped; checkpoints store both step and version). When nothing newer
than the checkpoint was sent, the version stays the checkpoint's (the engines already hold exactly
those weights).

NCCL weight sync is refused: every vLLM worker's NCCL communicator includes the dead rank 0, and
re-forming it would need every engine to tear down and re-join a group (not supported by the
worker extension, and a communicator broken mid-collective cannot be cancelled). The run then ends
with the `--resume` line, which rebuilds everything, the NCCL group included.
"""

from __future__ import annotations

import logging
from typing import Any

from cluster import checkpoints
from cluster.accounting import LearnerLost
from cluster.scheduler import LearnerRestored

log = logging.getLogger("bgrpo.driver")


def restart_learner_group(fleet: Any, weights: Any, error: BaseException) -> LearnerRestored:
    """Every rank rebuilt (`Fleet.restart_learners`), its last state loaded, the version moved above
    every version sent, the weight sync re-wired to the new rank 0 and every worker loaded."""
    import ray

    cfg = fleet.config.cluster
    if cfg.weight_sync != "object_store":
        raise LearnerLost(
            f"{error}; restarting the learner needs cluster.weight_sync object_store (with "
            f"{cfg.weight_sync} every engine's communicator includes the dead rank 0 and the group "
            "would have to be re-formed)") from error
    log.warning("%s: rebuilding the learner group from its last checkpoint", error)
    highest = weights.highest_sent
    fleet.restart_learners()
    step, source = _load_last_state(fleet)
    checkpoint_version = fleet.learner_version()
    version = checkpoint_version if highest <= checkpoint_version else highest + 1
    if version != checkpoint_version:
        ray.get([lr.advance_policy_version.remote(version) for lr in fleet.learners], timeout=600)
    weights.reconnect()
    loaded = weights.sync()
    log.warning("learner restored from %s (step %d, version %d) and sent as version %d", source, step,
                checkpoint_version, loaded)
    return LearnerRestored(step=step, checkpoint_version=checkpoint_version, version=loaded,
                           highest_sent=highest, source=source)


def _load_last_state(fleet: Any) -> tuple[int, str]:
    """(step, where from): the run's latest checkpoint, else the warm start's, else the new ranks'
    initial model as they are."""
    from cluster.warm_start import SFT_DIR
    from learner import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(fleet.run_dir / checkpoints.CHECKPOINTS)
    if latest is not None:
        cursor = checkpoints.load(fleet.learners, fleet.run_dir)
        return int(cursor["step"]), f"checkpoint {latest.name}"
    if ckpt.latest_checkpoint(fleet.run_dir / SFT_DIR) is not None:
        checkpoints.load(fleet.learners, fleet.run_dir, root=SFT_DIR)
        return 0, "the warm start's checkpoint"
    return 0, "the initial model"
