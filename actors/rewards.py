"""Step rewards -> shaped step rewards -> episode return.

The env's per-step rewards are recorded untouched in `Step.reward`; penalties (off by default) are
applied here when computing the return, so a run can be re-scored later from the Parquet data.
"""

from __future__ import annotations

from typing import Sequence

from core.trajectory import Step


def shaped_step_reward(step: Step, invalid_action_penalty: float = 0.0, step_penalty: float = 0.0) -> float:
    """The env reward minus the configured penalties for this step."""
    reward = step.reward - step_penalty
    if step.parse_fallback or step.action_error:
        reward -= invalid_action_penalty
    return reward


def aggregate(rewards: Sequence[float], how: str = "sum") -> float:
    """Combines per-step rewards into one episode return: "sum", "mean" or "max" (0.0 if empty)."""
    if how not in ("sum", "mean", "max"):
        raise ValueError(f"reward aggregation must be sum, mean or max, got {how!r}")
    if not rewards:
        return 0.0
    if how == "sum":
        return float(sum(rewards))
    if how == "mean":
        return float(sum(rewards) / len(rewards))
    return float(max(rewards))


def episode_return(
    steps: Sequence[Step],
    how: str = "sum",
    invalid_action_penalty: float = 0.0,
    step_penalty: float = 0.0,
) -> float:
    """The episode return from its steps under the given aggregation and penalties."""
    return aggregate(
        [shaped_step_reward(s, invalid_action_penalty, step_penalty) for s in steps], how
    )
