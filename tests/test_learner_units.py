"""Small hand-computed cases for the learner's objective pieces that the reference and TRL
comparisons (tests/test_grpo_loss.py, tests/test_learner.py) leave open: the loss's metric sums
(clip counts, importance-ratio extremes, KL), boundaries of the correction, NaN engine logprobs,
one-token sequences at the sequence level; advantage statistics; sample building and collation
details. Written to kill the surviving mutants of scripts/mutation_test.py that change results."""

from __future__ import annotations

import math

import pytest
import torch

from learner.config import GRPOConfig
from learner.loss import BatchNormalizer, _loss_sums, grpo_loss

D = torch.float64
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=D)
# pi / pi_old per token; padding positions hold values that must never count.
COEF = torch.tensor([[0.5, 1.0, 1.5, 9.0], [0.79, 1.0, 1.21, 1.0], [1.5, 0.5, 9.0, 9.0]], dtype=D)
ADV = torch.tensor([-1.0, 1.0, 0.0], dtype=D)
# Correction ratio exp(old - engine) per token; every active one above 1 (padding gets exactly 1).
RHO = torch.tensor([[1.5, 2.0, 4.0, 7.0], [1.1, 1.2, 1.3, 1.4], [1.25, 2.5, 7.0, 7.0]], dtype=D)
NORM = BatchNormalizer(num_sequences=3, num_tokens=9)


def _loss(cfg: GRPOConfig, rho: torch.Tensor = RHO, ref: torch.Tensor | None = None):
    old = torch.zeros_like(COEF)
    logps = torch.log(COEF).requires_grad_()
    return grpo_loss(logps, ADV, MASK, cfg, NORM, sampling_per_token_logps=old - torch.log(rho),
                     ref_per_token_logps=ref, old_per_token_logps=old)


def _f(sums, name: str) -> float:
    value = getattr(sums, name)
    assert value.dtype == D and value.shape == (), name  # summed with the other micro-batches
    return float(value)


@pytest.mark.parametrize("eps", [0.2, 0.0])
def test_clip_counts_take_only_active_tokens_on_the_clipping_side(eps):
    # Clipped low: ratio < 1 - eps with a negative advantage; high: ratio > 1 + eps with a
    # positive one. A zero advantage counts on neither side; ratio exactly 1 never counts.
    _, sums = _loss(GRPOConfig(epsilon=eps, vllm_importance_sampling_correction=False))
    assert (_f(sums, "clip_low"), _f(sums, "clip_high"), _f(sums, "clip_region")) == (1.0, 1.0, 2.0)
    assert _f(sums, "tokens") == 9.0
    # Correction off: every active token has ratio 1, none masked; no KL term.
    assert (_f(sums, "is_ratio"), _f(sums, "is_ratio_min"), _f(sums, "is_ratio_max")) == (9.0, 1.0, 1.0)
    assert (_f(sums, "is_masked"), _f(sums, "kl")) == (0.0, 0.0)


def test_correction_extremes_ignore_padding_truncate_and_mask():
    cfg = GRPOConfig(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=3.0)
    _, sums = _loss(cfg)
    active = [1.5, 2.0, 3.0, 1.1, 1.2, 1.3, 1.4, 1.25, 2.5]  # 4.0 truncated to 3.0
    assert _f(sums, "is_ratio") == pytest.approx(sum(active))
    assert (_f(sums, "is_ratio_min"), _f(sums, "is_ratio_max")) == pytest.approx((1.1, 3.0))
    assert _f(sums, "is_masked") == 0.0
    _, sums = _loss(GRPOConfig(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_max=3.0))
    assert _f(sums, "is_masked") == 1.0  # the 4.0 is set to 0
    assert (_f(sums, "is_ratio_min"), _f(sums, "is_ratio_max")) == pytest.approx((0.0, 2.5))
    assert _f(sums, "is_ratio") == pytest.approx(sum(active) - 3.0)


def test_empty_micro_batch_sums():
    empty = torch.zeros(0, 0, dtype=D)
    sums = _loss_sums(empty, torch.zeros(0, 1, dtype=D), empty, None, None, GRPOConfig())
    assert (float(sums.tokens), float(sums.is_ratio_min), float(sums.is_ratio_max)) == (0.0, math.inf, -math.inf)


def test_kl_sum_is_k3_over_active_tokens():
    ref = torch.log(COEF) + torch.tensor([[0.3, -0.2, 0.1, 5.0], [0.0, 0.4, -0.4, 0.2], [-0.1, 0.2, 5.0, 5.0]], dtype=D)
    cfg = GRPOConfig(beta=0.1, vllm_importance_sampling_correction=False)
    loss, sums = _loss(cfg, ref=ref)
    d = ref - torch.log(COEF)
    k3 = torch.exp(d) - d - 1
    assert _f(sums, "kl") == pytest.approx(float((k3 * MASK).sum()))
    loss0, _ = _loss(GRPOConfig(vllm_importance_sampling_correction=False))
    # dapo: (sum of surrogate + beta * kl over active tokens) / 9 tokens
    assert float((loss - loss0).detach()) == pytest.approx(0.1 * float((k3 * MASK).sum()) / 9)


def test_missing_logprobs_are_refused_with_the_reason():
    logps = torch.zeros(1, 2, dtype=D)
    mask = torch.ones(1, 2, dtype=D)
    with pytest.raises(ValueError, match="needs the engine's logprobs"):
        grpo_loss(logps, torch.ones(1, dtype=D), mask, GRPOConfig(), BatchNormalizer(1, 2))
    with pytest.raises(ValueError, match="beta > 0 needs the reference model's logprobs"):
        grpo_loss(logps, torch.ones(1, dtype=D), mask, GRPOConfig(beta=0.1, vllm_importance_sampling_correction=False),
                  BatchNormalizer(1, 2))


@pytest.mark.parametrize("lo, hi", [(1.0, 3.0), (None, 1.0)])
def test_mask_bounds_are_inclusive_and_nan_gets_ratio_one(lo, hi):
    # A ratio exactly at a bound is kept (TRL masks only outside [lo, hi]); a NaN engine logprob
    # means "no correction" for that token (ratio 1), not e or 0.
    cfg = GRPOConfig(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=lo,
                     vllm_importance_sampling_clip_max=hi)
    rho = torch.ones_like(RHO)
    _, sums = _loss(cfg, rho=rho)
    assert (_f(sums, "is_masked"), _f(sums, "is_ratio")) == (0.0, 9.0)
    old = torch.zeros_like(COEF)
    sampling = old.clone()
    sampling[1, 2] = float("nan")
    _, sums = grpo_loss(torch.log(COEF), ADV, MASK, cfg, NORM, sampling_per_token_logps=sampling,
                        old_per_token_logps=old)
    assert (_f(sums, "is_ratio_min"), _f(sums, "is_ratio_max"), _f(sums, "is_masked")) == (1.0, 1.0, 0.0)


def test_sequence_level_ratio_of_a_one_token_sequence():
    # GSPO: the sequence's ratio is exp(mean of its active log-ratios); one token -> that token's.
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=D)
    log_ratio = torch.tensor([[0.1, 0.7, 0.7], [0.1, 0.3, 0.9]], dtype=D)
    cfg = GRPOConfig(importance_sampling_level="sequence", epsilon=0.05,
                     vllm_importance_sampling_correction=False)
    adv = torch.tensor([1.0, 1.0], dtype=D)
    _, sums = grpo_loss(log_ratio, adv, mask, cfg, BatchNormalizer(2, 3),
                        old_per_token_logps=torch.zeros_like(log_ratio))
    # exp(0.1) = 1.105 > 1.05 clips row 0's one token; row 1's exp(0.2) clips its two.
    assert _f(sums, "clip_high") == 3.0
    loss, _ = grpo_loss(log_ratio, adv, mask, GRPOConfig(importance_sampling_level="sequence", epsilon=0.5,
                        vllm_importance_sampling_correction=False, loss_type="bnpo"),
                        BatchNormalizer(2, 3), old_per_token_logps=torch.zeros_like(log_ratio))
    assert float(loss) == pytest.approx(-(math.exp(0.1) + 2 * math.exp(0.2)) / 3)
