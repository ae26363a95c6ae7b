"""Group-normalised advantages of episodes, as TRL's GRPOTrainer computes them per completion.

An episode plays the role of TRL's completion: its return is the reward, its group (same task
and seed) is the GRPO group. Failed episodes (infrastructure) never enter: they are neither
scored nor used in the baseline. Groups may therefore be smaller than `num_generations`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl.trainer.utils import nanstd

from core.trajectory import Trajectory, TrajectoryGroup

from .config import GRPOConfig

# TRL adds this to the std before dividing (grpo_trainer.py: `advantages / (std_rewards + 1e-4)`).
STD_EPS = 1e-4


@dataclass
class EpisodeAdvantage:
    """One trainable episode and the advantage every one of its completion tokens carries."""

    trajectory: Trajectory
    advantage: float
    group_id: str


@dataclass
class AdvantageStats:
    """What happened to the groups of one batch (every episode is accounted for)."""

    groups_in: int = 0
    groups_used: int = 0
    zero_variance_groups: int = 0
    """Groups whose trainable returns are all equal (counted whether dropped or not)."""
    dropped_zero_variance_groups: int = 0
    dropped_small_groups: int = 0
    """Groups with fewer than `min_group_size` trainable episodes."""
    episodes_in: int = 0
    episodes_failed: int = 0
    """Failed (or empty) episodes: never trained on."""
    episodes_used: int = 0
    reward_mean: float = 0.0
    reward_std: float = 0.0
    dropped_reasons: dict[str, int] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        return {
            "groups": float(self.groups_used),
            "groups_in": float(self.groups_in),
            "zero_variance_groups": float(self.zero_variance_groups),
            "dropped_zero_variance_groups": float(self.dropped_zero_variance_groups),
            "dropped_small_groups": float(self.dropped_small_groups),
            "episodes": float(self.episodes_used),
            "episodes_failed": float(self.episodes_failed),
            "reward_mean": self.reward_mean,
            "reward_std": self.reward_std,
        }


def compute_advantages(
    groups: list[TrajectoryGroup], cfg: GRPOConfig
) -> tuple[list[EpisodeAdvantage], AdvantageStats]:
    """Advantage of each trainable episode: (return - group mean) / (std + 1e-4).

    `scale_rewards`: "group" divides by the group's std (unbiased, like TRL's `nanstd`), "batch"
    by the std of all trainable returns of the batch, "none" does not divide.
    """
    stats = AdvantageStats(groups_in=len(groups))
    kept: list[tuple[TrajectoryGroup, list[Trajectory]]] = []
    for g in groups:
        stats.episodes_in += len(g.trajectories)
        trainable = g.trainable_trajectories
        stats.episodes_failed += len(g.trajectories) - len(trainable)
        if len(trainable) < cfg.min_group_size:
            stats.dropped_small_groups += 1
            continue
        returns = torch.tensor([t.episode_return for t in trainable], dtype=torch.float64)
        zero_var = bool(torch.all(returns == returns[0]))
        if zero_var:
            stats.zero_variance_groups += 1
            if cfg.drop_zero_variance_groups:
                stats.dropped_zero_variance_groups += 1
                continue
        kept.append((g, trainable))

    stats.groups_used = len(kept)
    if not kept:
        return [], stats

    all_returns = torch.tensor(
        [t.episode_return for _, ts in kept for t in ts], dtype=torch.float64
    )
    stats.episodes_used = int(all_returns.numel())
    stats.reward_mean = float(all_returns.mean())
    stats.reward_std = float(nanstd(all_returns)) if all_returns.numel() > 1 else 0.0
    batch_std = stats.reward_std

    out: list[EpisodeAdvantage] = []
    for g, trainable in kept:
        returns = torch.tensor([t.episode_return for t in trainable], dtype=torch.float64)
        adv = returns - returns.mean()
        if cfg.scale_rewards == "group":
            std = float(nanstd(returns)) if returns.numel() > 1 else 0.0
            adv = adv / (std + STD_EPS)
        elif cfg.scale_rewards == "batch":
            adv = adv / (batch_std + STD_EPS)
        for t, a in zip(trainable, adv.tolist()):
            out.append(EpisodeAdvantage(trajectory=t, advantage=float(a), group_id=g.group_id))
    return out, stats
