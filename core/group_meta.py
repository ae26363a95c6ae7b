"""What the driver sees of a finished group: a few numbers per episode, never the steps.

A rollout worker returns two objects per group (`RolloutWorker.run_group_by_ref`): this metadata,
which the driver fetches and schedules on (accounting, staleness, per-task figures, evaluation,
resume cursors), and the `TrajectoryGroup` itself (token ids, logprobs, screenshots), which stays
in Ray's object store and reaches the learner by reference. So screenshots never pass through the
driver process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.trajectory import FAILED, Trajectory, TrajectoryGroup


@dataclass(frozen=True)
class EpisodeMeta:
    """One episode's outcome: status, success, return, and the policy version of every step."""

    status: str
    success: bool
    episode_return: float | None
    """None for a failed episode (`core.trajectory.Trajectory.episode_return`)."""
    trainable: bool
    policy_versions: tuple[int, ...]
    """One int per step (the policy lag figures are over every step of every trainable episode)."""
    failure_reason: str = ""

    @classmethod
    def of(cls, t: Trajectory) -> "EpisodeMeta":
        return cls(t.status, bool(t.success), None if t.episode_return is None else float(t.episode_return), bool(t.trainable),
                   tuple(int(v) for v in t.policy_versions), t.failure_reason)


@dataclass(frozen=True)
class GroupMeta:
    """A finished group without its payload (see the module docstring)."""

    group_id: str
    task: str
    seed: int
    episodes: tuple[EpisodeMeta, ...]
    worker_id: str = ""
    num_steps: int = 0
    """Steps over all episodes (the payload's size in model calls)."""

    @classmethod
    def of(cls, group: TrajectoryGroup) -> "GroupMeta":
        worker = next((t.worker_id for t in group.trajectories if t.worker_id), "")
        return cls(group.group_id, group.task, int(group.seed), tuple(EpisodeMeta.of(t) for t in group.trajectories),
                   worker, sum(len(t.steps) for t in group.trajectories))

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def trainable_episodes(self) -> list[EpisodeMeta]:
        return [e for e in self.episodes if e.trainable]

    @property
    def failed(self) -> bool:
        """Any episode failed for infrastructure reasons: the group is not trained on
        (the same test as `actors.rollout_worker.group_failed`)."""
        return any(e.status == FAILED for e in self.episodes)

    @property
    def min_policy_version(self) -> int:
        """Oldest policy version that produced any token of this group (-1 if no steps)."""
        versions = [v for e in self.episodes for v in e.policy_versions]
        return min(versions) if versions else -1

    @property
    def trainable_versions(self) -> list[int]:
        return [v for e in self.trainable_episodes for v in e.policy_versions]


def as_meta(group: Any) -> GroupMeta:
    """`group` as metadata: a GroupMeta as is, a TrajectoryGroup summarized (callers that hold the
    whole group in process, e.g. `bgrpo eval` and the tests, share the metadata code paths)."""
    return group if isinstance(group, GroupMeta) else GroupMeta.of(group)
