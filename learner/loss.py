"""The GRPO loss with TRL 1.16's semantics (`GRPOTrainer._compute_loss`), for one micro-batch.

Shapes: (B, T) for per-token tensors, B micro-batch rows, T the padded completion length.

Old-policy logprobs. The learner takes one optimizer step per batch (TRL's default
`num_iterations=1`), so the "old" policy of the clipped ratio is the current model itself:
`old_per_token_logps` is the current logprobs detached (ratio 1, gradient of the surrogate =
advantage * grad log pi). The engine's logprobs (possibly from an older policy version in async
mode, and from a different numerical implementation) are used only for the truncated
importance-sampling correction, exactly as TRL uses vLLM's logprobs:
    rho = exp(old_logp - engine_logp)   per token, or exp(sum over tokens) per sequence,
truncated (clamped to [clip_min, clip_max]) or masked (set to 0 outside) and multiplied into
the per-token loss.

Normalisation across micro-batches and ranks. A training batch (everything one `train_step`
receives) is cut into micro-batches and shared over ranks. TRL normalises grpo/bnpo/dr_grpo per
micro-batch and divides by the accumulation steps, which makes the update depend on how the
batch was cut (bnpo's docstring says so). Here every normaliser is a property of the WHOLE batch,
computed before it is cut (`BatchNormalizer`), and each micro-batch contributes its partial sum:
    grpo:    sum_i mean_t(l_it) / N_seq
    bnpo, dapo: sum_it l_it / N_tok            (N_tok: active completion tokens of the batch)
    dr_grpo: sum_it l_it / (N_seq * max_completion_length)
Gradients are summed over micro-batches and all-reduced with SUM over ranks, so any cut of the
batch gives the same update as one forward over the whole batch. With a single micro-batch on
one rank this is exactly TRL's loss (bnpo and dapo then coincide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import GRPOConfig


@dataclass(frozen=True)
class BatchNormalizer:
    """Denominators of the loss, computed over the whole batch before it is cut."""

    num_sequences: int
    """Training samples (rows) of the whole batch, masked ones included (as TRL's `.mean()`)."""
    num_tokens: int
    """Active completion tokens of the whole batch (after truncation masking)."""

    def denominator(self, cfg: GRPOConfig) -> float:
        if cfg.loss_type == "grpo":
            return float(max(self.num_sequences, 1))
        if cfg.loss_type in ("bnpo", "dapo"):
            return float(max(self.num_tokens, 1))
        if cfg.loss_type == "dr_grpo":
            return float(max(self.num_sequences, 1) * cfg.max_completion_length)
        raise ValueError(f"unknown loss_type {cfg.loss_type!r}")


def importance_sampling_correction(
    old_per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOConfig,
) -> torch.Tensor:
    """TRL's vLLM importance-sampling ratio: (B, T) for token_* modes, (B, 1) for sequence_*.

    Computed without gradient (it is a weight, not part of the policy). NaN engine logprobs get
    ratio 1 (TRL: "no correction").
    """
    with torch.no_grad():
        diff = (old_per_token_logps.detach() - sampling_per_token_logps) * mask
        diff = torch.nan_to_num(diff, nan=0.0)
        mode = cfg.vllm_importance_sampling_mode
        if mode.startswith("sequence"):
            diff = diff.sum(dim=-1, keepdim=True)
        ratio = torch.exp(diff)
        lo, hi = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
        if mode.endswith("_truncate"):
            ratio = torch.clamp(ratio, min=lo, max=hi)
        else:
            lo_v = -math.inf if lo is None else lo
            hi_v = math.inf if hi is None else hi
            ratio = ratio.masked_fill((ratio < lo_v) | (ratio > hi_v), 0.0)
    return ratio


@dataclass
class LossSums:
    """Sums over a micro-batch's active tokens (reduced over micro-batches and ranks, then
    divided by `tokens`), plus extremes of the importance-sampling ratio."""

    tokens: torch.Tensor
    kl: torch.Tensor
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    clip_region: torch.Tensor
    is_ratio: torch.Tensor
    is_ratio_min: torch.Tensor
    is_ratio_max: torch.Tensor
    is_masked: torch.Tensor
    """Active tokens whose correction ratio is 0 (masked by a *_mask mode)."""


def grpo_loss(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOConfig,
    normalizer: BatchNormalizer,
    sampling_per_token_logps: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    kl_per_token_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossSums]:
    """This micro-batch's share of the batch loss (see the module docstring) and its metric sums.

    per_token_logps: (B, T) with gradient; advantages: (B,) or (B, T); mask: (B, T) 0/1.
    sampling_per_token_logps: the engine's logprobs (B, T), needed when the correction is on.
    ref_per_token_logps: the reference model's (B, T), needed when beta > 0.
    old_per_token_logps: defaults to per_token_logps.detach() (one optimizer step per batch).
    kl_per_token_logps: the policy's logprobs the KL term compares with the reference's (with
    gradient); defaults to per_token_logps. The learner passes the full-softmax ones when it
    scores the ratio with the sampling filters (learner/logprobs.py).
    """
    mask = mask.to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(per_token_logps.dtype)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()

    coef_1 = _policy_ratio(per_token_logps, old_per_token_logps, mask, cfg)

    # --- clipped surrogate ---
    eps_low, eps_high = cfg.epsilon_low, cfg.resolved_epsilon_high
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    coef_1_capped = torch.clamp(coef_1, max=cfg.delta) if cfg.delta is not None else coef_1
    per_token_loss = -torch.min(coef_1_capped * advantages, coef_2 * advantages)

    # --- truncated importance sampling against the engine's logprobs ---
    is_ratio = None
    if cfg.vllm_importance_sampling_correction:
        if sampling_per_token_logps is None:
            raise ValueError("vllm_importance_sampling_correction needs the engine's logprobs")
        is_ratio = importance_sampling_correction(
            old_per_token_logps, sampling_per_token_logps.to(per_token_logps.dtype), mask, cfg
        )
        per_token_loss = per_token_loss * is_ratio

    # --- KL to the reference model ---
    per_token_kl = None
    if cfg.beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta > 0 needs the reference model's logprobs")
        policy = per_token_logps if kl_per_token_logps is None else kl_per_token_logps
        per_token_kl = _k3_kl(ref_per_token_logps.to(per_token_logps.dtype), policy)
        per_token_loss = per_token_loss + cfg.beta * per_token_kl

    loss = _aggregate(per_token_loss, mask, cfg) / normalizer.denominator(cfg)
    return loss, _loss_sums(coef_1, advantages, mask, is_ratio, per_token_kl, cfg)


def _k3_kl(ref_logps: torch.Tensor, policy_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) by the k3 estimator, as TRL: exp(d) - d - 1 with
    d = ref - policy (non-negative, unbiased for samples from the policy)."""
    d = ref_logps - policy_logps
    return torch.exp(d) - d - 1


def _aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """This micro-batch's partial sum of the batch loss (the caller divides by the whole batch's
    denominator): grpo averages each sequence over its own tokens first, the others sum tokens."""
    if cfg.loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    return (per_token_loss * mask).sum()


def _policy_ratio(
    per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, mask: torch.Tensor,
    cfg: GRPOConfig,
) -> torch.Tensor:
    """pi / pi_old per token (B, T), or per sequence (B, 1) from the mean log-ratio of its
    active tokens (GSPO's sequence level)."""
    log_ratio = per_token_logps - old_per_token_logps
    if cfg.importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    return torch.exp(log_importance_weights)


def _loss_sums(
    coef_1: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    is_ratio: torch.Tensor | None, per_token_kl: torch.Tensor | None, cfg: GRPOConfig,
) -> LossSums:
    """The micro-batch's metric sums (token-weighted; reduced by the caller)."""
    eps_low, eps_high = cfg.epsilon_low, cfg.resolved_epsilon_high
    with torch.no_grad():
        is_low = ((coef_1 < 1 - eps_low) & (advantages < 0)).to(mask.dtype)
        is_high = ((coef_1 > 1 + eps_high) & (advantages > 0)).to(mask.dtype)
        region = torch.clamp(is_low + is_high, max=1.0)

        def msum(x: torch.Tensor) -> torch.Tensor:
            return (x * mask).sum()

        # No boolean indexing (it would make the host wait for the GPU every micro-batch).
        active = mask > 0
        inf = torch.tensor(math.inf, dtype=mask.dtype, device=mask.device)
        if is_ratio is not None:
            full = is_ratio.expand_as(mask)
            is_sum, is_masked = msum(full), msum((full == 0).to(mask.dtype))
        else:
            full = torch.ones_like(mask)
            is_sum, is_masked = mask.sum(), torch.zeros((), dtype=mask.dtype, device=mask.device)
        vmin = torch.where(active, full, inf).min() if mask.numel() else inf
        vmax = torch.where(active, full, -inf).max() if mask.numel() else -inf
        return LossSums(
            tokens=mask.sum(),
            kl=msum(per_token_kl) if per_token_kl is not None else torch.zeros_like(mask.sum()),
            clip_low=msum(is_low),
            clip_high=msum(is_high),
            clip_region=msum(region),
            is_ratio=is_sum,
            is_ratio_min=vmin,
            is_ratio_max=vmax,
            is_masked=is_masked,
        )
