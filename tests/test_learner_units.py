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
    with pytest.raises(ValueError, match="^vllm_importance_sampling_correction needs the engine's logprobs$"):
        grpo_loss(logps, torch.ones(1, dtype=D), mask, GRPOConfig(), BatchNormalizer(1, 2))
    with pytest.raises(ValueError, match="^beta > 0 needs the reference model's logprobs$"):
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


# --- advantages ---------------------------------------------------------------------------------

from core.trajectory import FAILED, Step, Trajectory, TrajectoryGroup  # noqa: E402
from learner.advantages import compute_advantages  # noqa: E402
from learner.batching import (  # noqa: E402
    BatchError,
    TrainingSample,
    VisionSpec,
    batch_normalizer,
    build_samples,
    collate,
    micro_batches,
    shard,
    to_device,
)


def _traj(gid: str, i: int, ret: float, failed: bool = False, steps: list[Step] | None = None) -> Trajectory:
    if steps is None:
        steps = [Step(index=0, prompt_ids=[1, 2], completion_ids=[3], logprobs=[-1.0], policy_version=0)]
    return Trajectory(episode_id=f"{gid}-{i}", group_id=gid, task="t", seed=0, steps=steps,
                      episode_return=ret, status=FAILED if failed else "finished")


def _grp(gid: str, returns: list[float], failed: tuple[int, ...] = ()) -> TrajectoryGroup:
    return TrajectoryGroup(gid, "t", 0, [_traj(gid, i, r, i in failed) for i, r in enumerate(returns)])


def test_advantage_stats_account_for_every_group_and_episode():
    groups = [_grp("a", [1.0, 0.0, 0.5, 0.0], failed=(1,)), _grp("b", [1.0, 0.0], failed=(0,)),
              _grp("c", [2.0, 2.0, 2.0]), _grp("d", [3.0, 1.0])]
    eps, stats = compute_advantages(groups, GRPOConfig(scale_rewards="group"))
    used = [1.0, 0.5, 0.0, 2.0, 2.0, 2.0, 3.0, 1.0]
    mean = sum(used) / 8
    std = math.sqrt(sum((x - mean) ** 2 for x in used) / 7)  # unbiased, as TRL's nanstd
    assert stats.as_metrics() == pytest.approx({
        "groups": 3.0, "groups_in": 4.0, "zero_variance_groups": 1.0, "dropped_zero_variance_groups": 0.0,
        "dropped_small_groups": 1.0, "episodes": 8.0, "episodes_failed": 2.0, "reward_mean": mean,
        "reward_std": std})
    assert stats.episodes_in == 11 and stats.episodes_used == 8
    assert [(e.group_id, e.trajectory.episode_id) for e in eps][3:] == [
        ("c", "c-0"), ("c", "c-1"), ("c", "c-2"), ("d", "d-0"), ("d", "d-1")]
    assert [e.advantage for e in eps[-2:]] == pytest.approx([1 / (math.sqrt(2) + 1e-4), -1 / (math.sqrt(2) + 1e-4)])
    _, stats = compute_advantages(groups, GRPOConfig(drop_zero_variance_groups=True))
    assert (stats.groups_used, stats.zero_variance_groups, stats.dropped_zero_variance_groups) == (2, 1, 1)


def test_one_episode_groups_get_zero_advantage_not_nan():
    # min_group_size 1 lets a group of one through: its std is 0 (not NaN), so its advantage is 0.
    for scale in ("group", "batch", "none"):
        eps, stats = compute_advantages([_grp("a", [0.7])], GRPOConfig(min_group_size=1, scale_rewards=scale))
        assert [e.advantage for e in eps] == [0.0] and stats.reward_std == 0.0 and stats.reward_mean == pytest.approx(0.7)
    eps, stats = compute_advantages([_grp("a", [1.0, 0.0], failed=(0, 1))], GRPOConfig(min_group_size=1))
    assert eps == [] and stats.groups_used == 0 and stats.dropped_small_groups == 1 and stats.episodes_failed == 2


# --- batching -----------------------------------------------------------------------------------


def test_build_samples_records_each_step_and_prefers_its_own_sampling_settings():
    steps = [
        Step(index=0, prompt_ids=[1, 2], completion_ids=[7, 8], logprobs=[-0.1, -0.2], policy_version=3,
             finish_reason="length", images=[b"png"], temperature=0.5, top_k=4, top_p=0.8),
        Step(index=1, prompt_ids=[1], completion_ids=[], logprobs=[], policy_version=3),  # nothing sampled
        Step(index=2, prompt_ids=[5], completion_ids=[9], logprobs=[-0.3], policy_version=4, finish_reason="stop"),
    ]
    group = TrajectoryGroup("g", "t", 0, [_traj("g", 0, 1.0, steps=steps), _traj("g", 1, 0.0)])
    cfg = GRPOConfig(scale_rewards="none", temperature=0.9, top_k=6, top_p=0.95)
    samples, _ = build_samples([group], cfg)
    a, b, c = samples
    assert (a.prompt_ids, a.completion_ids, a.sampling_logprobs) == ([1, 2], [7, 8], [-0.1, -0.2])
    assert (a.advantage, a.truncated, a.policy_version, a.episode_id, a.group_id, a.step_index) == (
        0.5, True, 3, "g-0", "g", 0)
    assert (a.images, a.temperature, a.top_k, a.top_p) == ([b"png"], 0.5, 4, 0.8)
    assert (b.step_index, b.truncated, b.policy_version, b.temperature, b.top_k, b.top_p) == (2, False, 4, 0.9, 6, 0.95)
    assert (c.episode_id, c.advantage) == ("g-1", -0.5)
    assert (batch_normalizer(samples, cfg).num_sequences, batch_normalizer(samples, cfg).num_tokens) == (3, 4)
    masked = batch_normalizer(samples, GRPOConfig(mask_truncated_completions=True))
    assert (masked.num_sequences, masked.num_tokens) == (3, 2)


@pytest.mark.parametrize("step, message", [
    (Step(index=4, prompt_ids=[], completion_ids=[1], logprobs=[-1.0], policy_version=0), "step 4: empty prompt_ids$"),
    (Step(index=2, prompt_ids=[1], completion_ids=[1], logprobs=[-1.0], policy_version=0, temperature=0.0),
     "step 2: sampled greedily"),
])
def test_build_samples_refuses_untrainable_steps(step, message):
    group = TrajectoryGroup("g", "t", 0, [_traj("g", 0, 1.0, steps=[step]), _traj("g", 1, 0.0)])
    with pytest.raises(BatchError, match=f"^episode g-0 {message}"):
        build_samples([group], GRPOConfig())


def _sample(prompt: list[int], completion: list[int], truncated: bool = False, **kw) -> TrainingSample:
    return TrainingSample(prompt_ids=prompt, completion_ids=completion,
                          sampling_logprobs=[-0.5 - i for i in range(len(completion))], advantage=kw.pop("adv", 0.25),
                          truncated=truncated, policy_version=0, **kw)


def test_micro_batches_and_shards_keep_every_sample_once_in_order():
    xs = list(range(17))
    assert [len(m) for m in micro_batches(xs, 8)] == [6, 6, 5]
    assert sum(micro_batches(xs, 8), []) == xs
    assert micro_batches(list(range(16)), 8) == [list(range(8)), list(range(8, 16))]
    assert micro_batches(xs, 17) == [xs] and micro_batches([], 4) == []
    assert [len(m) for m in micro_batches(list(range(5)), 1)] == [1] * 5
    with pytest.raises(ValueError, match="^micro-batch size must be >= 1, got 0$"):
        micro_batches(xs, 0)
    assert shard(list(range(7)), 1, 3) == [1, 4] and shard(list(range(7)), 0, 1) == list(range(7))


def test_collate_layout_padding_and_per_row_settings():
    s1 = _sample([11, 12, 13], [21], truncated=True, temperature=0.5, top_k=3, top_p=0.9, adv=1.5)
    s2 = _sample([14], [22, 23, 24])
    b = collate([s1, s2], pad_token_id=99)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 99, 99], [99, 99, 14, 22, 23, 24]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert b["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]  # truncation kept unless asked
    assert b["sampling_logps"].tolist() == [[-0.5, 0, 0], [-0.5, -1.5, -2.5]]
    assert b["advantages"].tolist() == [1.5, 0.25] and b["logits_to_keep"] == 3
    assert (b["temperature"], b["top_k"], b["top_p"]) == ([0.5, 1.0], [3, -1], [0.9, 1.0])
    assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
    assert b["completion_mask"].dtype == b["sampling_logps"].dtype == b["advantages"].dtype == torch.float32
    assert "pixel_values" not in b and "mm_token_type_ids" not in b
    masked = collate([s1, s2], pad_token_id=99, mask_truncated_completions=True)
    assert masked["completion_mask"].tolist() == [[0, 0, 0], [1, 1, 1]]


def test_collate_refuses_inconsistent_image_inputs_and_marks_image_tokens():
    with pytest.raises(BatchError, match="^collate: empty micro-batch$"):
        collate([], pad_token_id=0)
    with pytest.raises(BatchError, match=r"^steps carry images but the model has no image processor \(text model\?\)$"):
        collate([_sample([1], [2], images=[b"png"])], pad_token_id=0)
    vision = VisionSpec(image_processor=None, image_token_id=7, merge_size=2)
    with pytest.raises(BatchError, match="^episode e step 3: image tokens in prompt_ids but no images recorded$"):
        collate([_sample([7, 1], [2], episode_id="e", step_index=3)], pad_token_id=0, vision=vision)
    # Text-only steps on a VL model: the image-token mask is 0 everywhere, padding included even
    # when the pad id equals the image token id.
    b = collate([_sample([1, 2], [3]), _sample([1], [3, 4])], pad_token_id=7, vision=vision)
    assert b["mm_token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert b["mm_token_type_ids"].dtype == torch.int32
    assert "pixel_values" not in b


def test_to_device_moves_tensors_and_keeps_lists():
    b = to_device({"x": torch.ones(2), "top_k": [1, 2], "n": 3}, "cpu")
    assert torch.equal(b["x"], torch.ones(2)) and b["top_k"] == [1, 2] and b["n"] == 3
    assert to_device({"x": torch.ones(2)}, "meta")["x"].device.type == "meta"  # really moved


def test_collate_images_through_a_real_image_processor():
    # Qwen2-VL's image processor (patch 14, merge 2): a 56x56 image is a 4x4 patch grid, 16
    # patch rows of pixel_values and 16 / 2**2 = 4 image tokens in the prompt.
    from transformers import Qwen2VLImageProcessorPil

    from tests.fixtures.learner import png_bytes

    proc = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                    min_pixels=56 * 56, max_pixels=56 * 56 * 4)
    vision = VisionSpec(image_processor=proc, image_token_id=7, merge_size=2)
    red, wide = png_bytes(56, 56), png_bytes(112, 56, (0, 90, 200))
    img = _sample([1, 7, 7, 7, 7, 2], [3], images=[red])
    text = _sample([1, 2], [3, 4])
    two = _sample([7] * 12, [5], images=[red, wide])
    cache: dict = {}
    b = collate([img, text, two, img], pad_token_id=0, vision=vision, image_cache=cache)
    assert b["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 8], [1, 4, 4]]
    assert b["pixel_values"].shape == (16 + 16 + 32 + 16, 1176)
    assert torch.equal(b["pixel_values"][:16], b["pixel_values"][-16:])  # the same image, the same rows
    assert int(b["mm_token_type_ids"][0].sum()) == 4 and int(b["mm_token_type_ids"][1].sum()) == 0
    assert len(cache) == 2  # one entry per distinct image list: the repeated one was processed once
    # A cached entry is used as is (the G episodes of a group share their first screenshot).
    key = next(k for k, v in cache.items() if v["image_grid_thw"].tolist() == [[1, 4, 4]])
    cache[key] = {"pixel_values": torch.full((16, 1176), 0.5), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    b = collate([img], pad_token_id=0, vision=vision, image_cache=cache)
    assert torch.equal(b["pixel_values"], torch.full((16, 1176), 0.5))
    b = collate([img], pad_token_id=0, vision=vision)  # no cache: processed afresh
    assert not torch.equal(b["pixel_values"], torch.full((16, 1176), 0.5))
    bad = _sample([7, 7, 7], [3], images=[red], episode_id="e", step_index=1)
    with pytest.raises(BatchError, match=r"^episode e step 1: prompt_ids hold 3 image tokens but the 1 recorded "
                                         r"image\(s\) make 4 with this image processor"):
        collate([bad], pad_token_id=0, vision=vision)
    missing = _sample([7, 7], [3], episode_id="e", step_index=2)
    with pytest.raises(BatchError, match="^episode e step 2: 2 image tokens in prompt_ids but no images recorded$"):
        collate([img, missing], pad_token_id=0, vision=vision)


def test_advantages_counts_and_precision():
    # Every dropped or zero-variance group counts (two of each here), and returns are taken in
    # float64: a difference float32 would lose still makes a group non-constant.
    groups = [_grp("s1", [1.0]), _grp("s2", [0.0, 1.0], failed=(0,)), _grp("z1", [2.0, 2.0]), _grp("z2", [0.5, 0.5]),
              _grp("n", [1.0, 1.0 + 1e-9]), _grp("p", [0.1, 0.2, 0.7])]
    eps, stats = compute_advantages(groups, GRPOConfig(drop_zero_variance_groups=True))
    assert (stats.dropped_small_groups, stats.zero_variance_groups, stats.dropped_zero_variance_groups) == (2, 2, 2)
    assert [e.group_id for e in eps] == ["n", "n", "p", "p", "p"]
    r = [0.1, 0.2, 0.7]
    m = sum(r) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in r) / 2)
    assert [e.advantage for e in eps[2:]] == pytest.approx([(x - m) / (sd + 1e-4) for x in r], rel=1e-12, abs=0)
    assert stats.reward_mean == pytest.approx((2.0 + 1e-9 + 1.0) / 5, rel=1e-12, abs=0)
    # A batch of two episodes has a std (it is not "too small to have one").
    _, stats = compute_advantages([_grp("a", [1.0, 0.0])], GRPOConfig())
    assert stats.reward_std == pytest.approx(math.sqrt(0.5))


def test_integer_mask_gives_the_float_mask_results():
    # The mask may come as 0/1 integers: it is cast to the logprobs' dtype before any use (an
    # integer mask would otherwise make the metric sums integer and the ratio extremes wrong).
    cfg = GRPOConfig(vllm_importance_sampling_mode="token_truncate")
    old = torch.zeros_like(COEF)
    kw = dict(sampling_per_token_logps=old - torch.log(RHO), old_per_token_logps=old)
    loss_f, sums_f = grpo_loss(torch.log(COEF), ADV, MASK, cfg, NORM, **kw)
    loss_i, sums_i = grpo_loss(torch.log(COEF), ADV, MASK.long(), cfg, NORM, **kw)
    assert float(loss_i) == pytest.approx(float(loss_f), rel=1e-12)
    for name in ("tokens", "clip_low", "clip_high", "is_ratio", "is_ratio_min", "is_ratio_max", "is_masked"):
        assert _f(sums_i, name) == pytest.approx(_f(sums_f, name), rel=1e-12), name


def test_metric_sums_stay_on_the_batch_device():
    # The sums of all micro-batches are reduced together on the learner's device; the "meta"
    # device stands in for a GPU here (no GPU on the test machine): every sum must live on it.
    meta = dict(device="meta", dtype=D)
    mask = torch.ones(2, 3, **meta)
    for is_ratio in (None, torch.ones(2, 3, **meta)):
        sums = _loss_sums(torch.ones(2, 3, **meta), torch.ones(2, 1, **meta), mask, is_ratio, None, GRPOConfig())
        assert {k: (v.device.type, v.dtype) for k, v in vars(sums).items()} == {k: ("meta", D) for k in vars(sums)}


def test_images_are_decoded_to_rgb_and_counted_with_the_merge_size():
    import io

    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    from learner.batching import _decode_png

    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (1, 2, 3, 128)).save(buf, format="PNG")
    assert _decode_png(buf.getvalue()).mode == "RGB"  # screenshots with alpha reach the processor as RGB
    # Without merging (merge_size 1) every patch of the 4x4 grid is one image token.
    proc = Qwen2VLImageProcessorPil(patch_size=14, merge_size=1, temporal_patch_size=2,
                                    min_pixels=56 * 56, max_pixels=56 * 56 * 4)
    b = collate([_sample([7] * 16, [3], images=[_png56()])], pad_token_id=0,
                vision=VisionSpec(image_processor=proc, image_token_id=7, merge_size=1))
    assert b["image_grid_thw"].tolist() == [[1, 4, 4]]


def _png56() -> bytes:
    from tests.fixtures.learner import png_bytes

    return png_bytes(56, 56)
