"""The GRPO loss against (1) a float64 reference written from the formulas, token by token, and
(2) TRL 1.16's own `GRPOTrainer._compute_loss` on the same batch; loss AND gradients, every loss
type. Plus the normalisation claim: any cut into micro-batches gives the whole-batch gradient."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.utils import selective_log_softmax

from learner.config import GRPOConfig
from learner.loss import BatchNormalizer, grpo_loss

B, T, V = 6, 7, 11
TOL = 1e-5  # float32 implementation vs float64 reference (relative to max(1, |value|))


def _inputs(seed: int, sampling_noise: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    completion_ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    advantages[1] = 0.0
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    # The engine's logprobs: near the learner's, some far (exercise truncation and masking).
    sampling = logp + sampling_noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampling[2, 0] -= 3.0
    ref_logits = logits + 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.log_softmax(ref_logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    # A stale "old" policy for the clipping paths (num_iterations > 1 / async): ratio != 1.
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return logits, completion_ids, mask, advantages, sampling, ref, old


def reference_loss(logits, ids, mask, adv, sampling, ref, old, cfg: GRPOConfig) -> torch.Tensor:
    """Float64, loops, straight from the formulas (TRL's documented semantics)."""
    logp_all = torch.log_softmax(logits, -1)
    eps_lo, eps_hi = cfg.epsilon, cfg.resolved_epsilon_high
    lo, hi = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
    total = logits.new_zeros(())
    n_tokens = float(mask.sum())
    per_seq = []
    for i in range(B):
        L = int(mask[i].sum())
        lp = [logp_all[i, t, ids[i, t]] for t in range(L)]
        old_i = [lp[t].detach() if old is None else old[i, t] for t in range(L)]
        if cfg.importance_sampling_level == "sequence":
            s = sum(lp[t] - old_i[t] for t in range(L)) / L
            ratios = [torch.exp(s)] * L
        else:
            ratios = [torch.exp(lp[t] - old_i[t]) for t in range(L)]
        # truncated importance sampling, from the detached old logprobs
        if cfg.vllm_importance_sampling_correction:
            mode = cfg.vllm_importance_sampling_mode
            if mode.startswith("sequence"):
                r = math.exp(sum(float(old_i[t]) - float(sampling[i, t]) for t in range(L)))
                rho = [r] * L
            else:
                rho = [math.exp(float(old_i[t]) - float(sampling[i, t])) for t in range(L)]
            out = []
            for r in rho:
                if mode.endswith("truncate"):
                    r = min(r, hi) if hi is not None else r
                    r = max(r, lo) if lo is not None else r
                else:
                    if (hi is not None and r > hi) or (lo is not None and r < lo):
                        r = 0.0
                out.append(r)
            rho = out
        else:
            rho = [1.0] * L
        terms = []
        a = adv[i]
        for t in range(L):
            r = ratios[t]
            r_cap = torch.clamp(r, max=cfg.delta) if cfg.delta is not None else r
            clipped = torch.clamp(r, 1 - eps_lo, 1 + eps_hi)
            term = -torch.min(r_cap * a, clipped * a) * rho[t]
            if cfg.beta:
                d = ref[i, t] - lp[t]
                term = term + cfg.beta * (torch.exp(d) - d - 1)
            terms.append(term)
        seq_sum = sum(terms) if terms else logits.new_zeros(())
        per_seq.append(seq_sum / max(L, 1))
        total = total + seq_sum
    if cfg.loss_type == "grpo":
        return sum(per_seq) / B
    if cfg.loss_type in ("bnpo", "dapo"):
        return total / n_tokens
    if cfg.loss_type == "dr_grpo":
        return total / (B * cfg.max_completion_length)
    raise AssertionError(cfg.loss_type)


def ours(logits, ids, mask, adv, sampling, ref, old, cfg, rows=None, normalizer=None):
    rows = slice(None) if rows is None else rows
    logps = selective_log_softmax(logits[rows].float(), ids[rows])
    norm = normalizer or BatchNormalizer(num_sequences=logits.shape[0], num_tokens=int(mask.sum()))
    loss, _ = grpo_loss(
        logps,
        adv[rows].float(),
        mask[rows].float(),
        cfg,
        norm,
        sampling_per_token_logps=sampling[rows].float(),
        ref_per_token_logps=ref[rows].float() if cfg.beta else None,
        old_per_token_logps=None if old is None else old[rows].float(),
    )
    return loss


CASES = [
    dict(loss_type=lt, importance_sampling_level=lvl, vllm_importance_sampling_mode=mode, beta=beta)
    for lt in ("grpo", "dr_grpo", "dapo", "bnpo")
    for lvl, mode, beta in (
        ("token", "token_truncate", 0.0),
        ("token", "token_mask", 0.04),
        ("sequence", "sequence_mask", 0.0),
        ("token", "sequence_truncate", 0.04),
    )
]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    scale = max(1.0, float(b.abs().max()))
    assert float((a.double() - b.double()).abs().max()) <= tol * scale, (a, b)


@pytest.mark.parametrize("stale", [False, True], ids=["on_policy", "stale_old"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_loss_and_gradients_match_float64_reference(case, stale):
    cfg = GRPOConfig(
        epsilon=0.2, epsilon_high=0.28, max_completion_length=16,
        vllm_importance_sampling_clip_min=0.5 if case["vllm_importance_sampling_mode"].endswith("truncate") else None,
        **case,
    )
    cfg.validate()
    logits, ids, mask, adv, sampling, ref, old = _inputs(seed=7)
    old = old if stale else None

    x64 = logits.clone().requires_grad_(True)
    ref_loss = reference_loss(x64, ids, mask, adv, sampling, ref, old, cfg)
    ref_loss.backward()

    x32 = logits.float().clone().requires_grad_(True)
    loss = ours(x32, ids, mask, adv, sampling, ref, old, cfg)
    loss.backward()

    _close(loss.detach(), ref_loss.detach())
    _close(x32.grad, x64.grad)
    assert float(x64.grad.abs().sum()) > 0  # the comparison is not vacuous


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_micro_batches_give_the_whole_batch_gradient(loss_type):
    """Cut the batch 3 ways (uneven): summed micro-batch gradients == one whole-batch backward."""
    cfg = GRPOConfig(loss_type=loss_type, beta=0.04, vllm_importance_sampling_mode="token_truncate")
    logits, ids, mask, adv, sampling, ref, _ = _inputs(seed=3)
    norm = BatchNormalizer(num_sequences=B, num_tokens=int(mask.sum()))

    whole = logits.float().clone().requires_grad_(True)
    ours(whole, ids, mask, adv, sampling, ref, None, cfg, normalizer=norm).backward()

    parts = logits.float().clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        loss = ours(parts, ids, mask, adv, sampling, ref, None, cfg, rows=rows, normalizer=norm)
        loss.backward()
        total += float(loss.detach())
    _close(parts.grad, whole.grad, 1e-6)


def test_micro_batches_are_balanced_and_keep_every_sample_in_order():
    """As few micro-batches as the size allows, sizes within one of each other (no 1-sample tail
    that would recompile a compiled learner), every sample once, in order."""
    from learner.batching import micro_batches

    for n, size in [(17, 8), (16, 8), (9, 8), (1, 8), (0, 8), (7, 1), (33, 4)]:
        chunks = micro_batches(list(range(n)), size)
        sizes = [len(c) for c in chunks]
        assert len(chunks) == -(-n // size)
        assert all(0 < k <= size for k in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
        assert [x for c in chunks for x in c] == list(range(n))
    assert [len(c) for c in micro_batches(list(range(17)), 8)] == [6, 6, 5]
    with pytest.raises(ValueError, match="micro-batch size"):
        micro_batches([1], 0)


# --- TRL's own loss on the same batch ------------------------------------------------------


def _trl_loss(logits, ids, mask, adv, is_ratio, ref, cfg: GRPOConfig, old=None):
    """Calls `GRPOTrainer._compute_loss` unbound, with a stand-in `self` that holds exactly the
    attributes it reads (one process, no accumulation) and returns our logits' logprobs."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kw):
        logps = selective_log_softmax(logits, ids)
        return logps, torch.zeros_like(logps), None

    accel = SimpleNamespace(
        num_processes=1,
        reduce=lambda x, reduction="sum": x,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        sync_gradients=True,
    )
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=cfg.importance_sampling_level,
        beta=cfg.beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=cfg.delta, steps_per_generation=1),
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon,
        epsilon_high=cfg.resolved_epsilon_high,
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=cfg.max_completion_length,
        accelerator=accel,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask.long(),
        "advantages": adv.float(),
        "importance_sampling_ratio": is_ratio,
        "ref_per_token_logps": ref.float(),
        "num_items_in_batch": mask.sum(),
    }
    if old is not None:  # num_iterations > 1: TRL's logprobs of the policy that generated
        inputs["old_per_token_logps"] = old
    return GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_trl_compute_loss(loss_type, level):
    from learner.loss import importance_sampling_correction

    cfg = GRPOConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_high=0.28,
        vllm_importance_sampling_mode="token_truncate", max_completion_length=16,
    )
    logits, ids, mask, adv, sampling, ref, _ = _inputs(seed=11)
    with torch.no_grad():
        logp = selective_log_softmax(logits.float(), ids)
    # The correction ratio is computed inline in TRL's generation code (not callable); both
    # sides get the same one here, and the float64 test above checks ours from the formulas.
    is_ratio = importance_sampling_correction(logp, sampling.float(), mask.float(), cfg)

    a = logits.float().clone().requires_grad_(True)
    trl = _trl_loss(a, ids, mask, adv, is_ratio, ref, cfg)
    trl.backward()
    b = logits.float().clone().requires_grad_(True)
    mine = ours(b, ids, mask, adv, sampling, ref, None, cfg)
    mine.backward()
    _close(mine.detach(), trl.detach(), 1e-6)
    _close(b.grad, a.grad, 1e-6)
    assert float(a.grad.abs().sum()) > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_second_iteration_matches_trl_and_clips(loss_type, level):
    """num_iterations = 2 (TRL's mu): the second pass scores with moved weights against the
    first pass's logprobs as the old policy; TRL gets them as `old_per_token_logps` and computes
    the correction ratio from them too. Loss and gradients agree, and clipping acts."""
    from learner.loss import importance_sampling_correction

    cfg = GRPOConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_high=0.28,
        delta=1.5, vllm_importance_sampling_mode="token_truncate", max_completion_length=16,
        num_iterations=2,
    )
    logits, ids, mask, adv, sampling, ref, _ = _inputs(seed=12)
    with torch.no_grad():
        first = selective_log_softmax(logits.float(), ids)  # pass 1: the old policy
    is_ratio = importance_sampling_correction(first, sampling.float(), mask.float(), cfg)
    # Pass 2: the weights moved after the first optimizer step.
    g = torch.Generator().manual_seed(5)
    moved = logits + 0.8 * torch.randn(logits.shape, generator=g, dtype=logits.dtype)

    a = moved.float().clone().requires_grad_(True)
    trl = _trl_loss(a, ids, mask, adv, is_ratio, ref, cfg, old=first)
    trl.backward()
    b = moved.float().clone().requires_grad_(True)
    logp = selective_log_softmax(b, ids)
    n = BatchNormalizer(num_sequences=B, num_tokens=int(mask.sum()))
    mine, sums = grpo_loss(logp, adv.float(), mask.float(), cfg, n, sampling_per_token_logps=sampling.float(),
                           ref_per_token_logps=ref.float(), old_per_token_logps=first)
    mine.backward()
    _close(mine.detach(), trl.detach(), 1e-6)
    _close(b.grad, a.grad, 1e-6)
    assert float(sums.clip_region) > 0  # the ratio is no longer 1: clipping acts


def test_config_rejects_bad_values():
    for bad in (
        dict(loss_type="ppo"),
        dict(scale_rewards="rank"),
        dict(importance_sampling_level="episode"),
        dict(vllm_importance_sampling_mode="clip"),
        dict(vllm_importance_sampling_clip_min=3.0, vllm_importance_sampling_clip_max=1.0),
        dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
        dict(epsilon=-0.1),
        dict(beta=-1.0),
        dict(temperature=0.0),
    ):
        with pytest.raises(ValueError):
            GRPOConfig(**bad).validate()
