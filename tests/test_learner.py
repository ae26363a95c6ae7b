"""Learner: advantages, batching, weight names and publishing, train steps (text and VL),
checkpoint resume, a checkpoint killed mid-write."""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from core.trajectory import FAILED, Step, Trajectory, TrajectoryGroup
from learner.advantages import compute_advantages
from learner.batching import BatchError, batch_normalizer, build_samples, collate
from learner.config import GRPOConfig, LearnerConfig
from tests.fixtures.learner import png_bytes, synthetic_groups, vl_group

REPO = Path(__file__).resolve().parents[1]


def _group(gid: str, returns: list[float], failed: tuple[int, ...] = ()) -> TrajectoryGroup:
    trajs = []
    for i, r in enumerate(returns):
        steps = [Step(index=0, prompt_ids=[1, 2, 3], completion_ids=[4, 5], logprobs=[-1.0, -2.0],
                      policy_version=0)]
        trajs.append(Trajectory(
            episode_id=f"{gid}-{i}", group_id=gid, task="t", seed=0, steps=steps,
            episode_return=r, status=FAILED if i in failed else "finished",
        ))
    return TrajectoryGroup(gid, "t", 0, trajs)


# --- advantages ----------------------------------------------------------------------------


def test_group_advantages_follow_trl_formula():
    g = _group("a", [1.0, 0.0, 0.0, 1.0, 1.0])
    eps, _ = compute_advantages([g], GRPOConfig(scale_rewards="group"))
    r = [1.0, 0.0, 0.0, 1.0, 1.0]
    mean, std = statistics.mean(r), statistics.stdev(r)  # TRL's nanstd is the unbiased std
    assert [e.advantage for e in eps] == pytest.approx([(x - mean) / (std + 1e-4) for x in r])


def test_batch_and_none_scaling():
    g1, g2 = _group("a", [1.0, 0.0]), _group("b", [3.0, 0.0, 0.0])
    eps, stats = compute_advantages([g1, g2], GRPOConfig(scale_rewards="batch"))
    all_r = [1.0, 0.0, 3.0, 0.0, 0.0]
    bstd = statistics.stdev(all_r)
    expected = [0.5 / (bstd + 1e-4), -0.5 / (bstd + 1e-4), 2 / (bstd + 1e-4), -1 / (bstd + 1e-4), -1 / (bstd + 1e-4)]
    assert [e.advantage for e in eps] == pytest.approx(expected)
    assert stats.reward_mean == pytest.approx(statistics.mean(all_r))
    eps, _ = compute_advantages([g1, g2], GRPOConfig(scale_rewards="none"))
    assert [e.advantage for e in eps] == pytest.approx([0.5, -0.5, 2.0, -1.0, -1.0])


def test_failed_episodes_never_enter_and_small_groups_drop():
    # Episode 1 failed with return 0: it must neither be trained on nor shift the baseline.
    g = _group("a", [1.0, 0.0, 0.5, 0.0], failed=(1,))
    lonely = _group("b", [1.0, 0.0], failed=(0,))
    eps, stats = compute_advantages([g, lonely], GRPOConfig(scale_rewards="none"))
    assert [e.trajectory.episode_id for e in eps] == ["a-0", "a-2", "a-3"]
    assert [e.advantage for e in eps] == pytest.approx([0.5, 0.0, -0.5])
    assert stats.episodes_failed == 2 and stats.dropped_small_groups == 1 and stats.groups_used == 1


def test_zero_variance_groups_counted_and_optionally_dropped():
    groups = [_group("a", [1.0, 1.0, 1.0]), _group("b", [1.0, 0.0])]
    eps, stats = compute_advantages(groups, GRPOConfig())
    assert stats.zero_variance_groups == 1 and len(eps) == 5
    assert [e.advantage for e in eps[:3]] == [0.0, 0.0, 0.0]
    eps, stats = compute_advantages(groups, GRPOConfig(drop_zero_variance_groups=True))
    assert stats.dropped_zero_variance_groups == 1 and len(eps) == 2


# --- batching ------------------------------------------------------------------------------


def test_every_step_is_a_sample_carrying_its_episode_advantage():
    groups = synthetic_groups(seed=5, n_groups=3, group_size=4, max_steps=3)
    cfg = GRPOConfig()
    samples, _ = build_samples(groups, cfg)
    eps, _ = compute_advantages(groups, cfg)
    by_episode = {e.trajectory.episode_id: e.advantage for e in eps}
    n_steps = sum(len(t.steps) for g in groups for t in g.trajectories)
    assert len(samples) == n_steps
    for s in samples:
        assert s.advantage == by_episode[s.episode_id]
    norm = batch_normalizer(samples, GRPOConfig(mask_truncated_completions=True))
    assert norm.num_tokens == sum(len(s.completion_ids) for s in samples if not s.truncated)
    assert norm.num_sequences == n_steps


def test_collate_pads_prompts_left_and_completions_right():
    groups = synthetic_groups(seed=1)
    samples, _ = build_samples(groups, GRPOConfig())
    batch = collate(samples[:3], pad_token_id=0, mask_truncated_completions=True)
    T = batch["logits_to_keep"]
    for i, s in enumerate(samples[:3]):
        row = batch["input_ids"][i]
        assert row[-T:][: len(s.completion_ids)].tolist() == s.completion_ids
        P = row.numel() - T
        assert row[P - len(s.prompt_ids) : P].tolist() == s.prompt_ids
        assert int(batch["attention_mask"][i].sum()) == s.num_tokens
        assert int(batch["completion_mask"][i].sum()) == (0 if s.truncated else len(s.completion_ids))
        assert batch["sampling_logps"][i, : len(s.completion_ids)].tolist() == pytest.approx(s.sampling_logprobs)


# --- the learner on the tiny text model ---------------------------------------------------


def _learner(model_path, **kw):
    from learner.learner import Learner

    grpo = kw.pop("grpo", GRPOConfig(vllm_importance_sampling_mode="token_truncate"))
    return Learner(LearnerConfig(model_path=str(model_path), grpo=grpo, **kw))


def test_padded_batch_logprobs_equal_unpadded_per_sample(tiny_text_model):
    """The layout gives each completion token the logprob of the unpadded sequence."""
    learner = _learner(tiny_text_model)
    samples, _ = build_samples(synthetic_groups(seed=2), learner.cfg)
    samples = samples[:4]
    with torch.no_grad():
        batch = collate(samples, learner.pad_token_id)
        logps, _ = learner._completion_logps(learner.model, batch, with_entropy=False)
        for i, s in enumerate(samples):
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = learner.model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
            ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
            torch.testing.assert_close(logps[i, : len(s.completion_ids)], ref, atol=1e-5, rtol=1e-5)


def test_weight_names_are_save_pretrained_names(tiny_text_model, tiny_vl_model, tmp_path):
    from safetensors.torch import load_file

    from learner.learner import load_model
    from learner.weights import hf_named_tensors

    for path in (tiny_text_model, tiny_vl_model):
        model = load_model(str(path))
        named = hf_named_tensors(model)
        out = tmp_path / path.name
        model.save_pretrained(out)
        saved = load_file(str(out / "model.safetensors"))
        assert set(named) == set(saved)
        for k in named:
            torch.testing.assert_close(named[k], saved[k])


def test_train_step_metrics_and_version(tiny_text_model, make_groups):
    learner = _learner(tiny_text_model, lr=1e-3, micro_batch_size=3)
    before = learner.get_weights()
    m = learner.train_step(make_groups(seed=0))
    assert learner.policy_version == 1 and m["policy_version"] == 1.0
    for key in ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "grad_norm", "is_ratio/mean", "is_ratio/min",
                "is_ratio/max", "tokens", "samples", "zero_variance_groups", "lr", "step_time_s"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert m["grad_norm"] > 0 and m["tokens"] > 0 and m["entropy"] > 0
    # Values a bug could get wrong: the counts are the batch's own, one pass (mu=1) never clips
    # (the ratio is exactly 1), beta=0 has no KL, the entropy is that of a V-way distribution.
    groups = make_groups(seed=0)
    samples, _ = build_samples(groups, learner.cfg)
    assert m["tokens"] == sum(len(s.completion_ids) for s in samples)
    assert m["samples"] == len(samples)
    assert m["prompt_tokens"] == sum(len(s.prompt_ids) for s in samples)
    assert m["episodes"] == sum(len(g.trajectories) for g in groups) and m["groups"] == len(groups)
    assert m["reward_mean"] == pytest.approx(statistics.mean(t.episode_return for g in groups for t in g.trajectories))
    assert m["clip_ratio/low_mean"] == m["clip_ratio/high_mean"] == m["clip_ratio/region_mean"] == 0.0
    assert m["kl"] == 0.0
    vocab = learner.model.get_output_embeddings().out_features
    assert 0 < m["entropy"] <= math.log(vocab) + 1e-6
    after = learner.get_weights()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # A batch with nothing trainable does not step and does not move the version.
    only_failed = [_group("x", [1.0, 0.0], failed=(0, 1))]
    m = learner.train_step(only_failed)
    assert m["skipped"] == 1.0 and learner.policy_version == 1
    # Equal returns in every group: all advantages are 0, so the gradient is exactly 0.
    flat = [_group("y", [1.0, 1.0, 1.0]), _group("z", [0.0, 0.0])]
    m = learner.train_step(flat)
    assert m["zero_variance_groups"] == 2 and m["episodes"] == 5 and m["samples"] == 5
    assert m["tokens"] == 5 * 2 and m["grad_norm"] == 0.0


def test_per_token_lag_uses_each_tokens_version(tiny_text_model, make_groups):
    """With in-flight weight updates a step's tokens carry different versions: the learner's
    per-token lag counts each token at its own version, the per-sample lag at the step's oldest."""
    learner = _learner(tiny_text_model, lr=1e-3, micro_batch_size=3)
    learner.train_step(make_groups(seed=0))  # now at version 1
    groups = make_groups(seed=1)
    old_tokens = total = 0
    for step in (s for g in groups for t in g.trajectories for s in t.steps):
        n = len(step.completion_ids)
        step.policy_version, step.token_versions = 0, [0] * (n // 2) + [1] * (n - n // 2)
        old_tokens, total = old_tokens + n // 2, total + n
    m = learner.train_step(groups)
    assert 0 < old_tokens < total
    assert m["staleness_mean"] == pytest.approx(1.0)  # every sample's oldest token is version 0
    assert m["staleness_token_mean"] == pytest.approx(old_tokens / total)
    assert m["staleness_token_max"] == 1.0


def test_published_versions_are_whole_and_immutable(tiny_text_model, make_groups, ray_cluster):
    learner = _learner(tiny_text_model, lr=1e-3)
    h0 = learner.send_weights("object_store")
    assert learner.send_weights("object_store") is h0  # one publish per version
    learner.train_step(make_groups(seed=0))
    h1 = learner.send_weights("object_store")
    assert (h0.version, h1.version) == (0, 1)
    w0, w1 = h0.fetch(), h1.fetch()
    assert set(w0) == set(w1) == set(learner.get_weights()) and h1.num_tensors == len(w1)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # v0 is still v0 after v1 exists
    current = learner.get_weights()
    assert all(torch.equal(w1[k], current[k]) for k in w1)
    with pytest.raises(ValueError):
        learner.weight_senders.get("object_store").publish(1, current)  # versions only move forward


def test_vl_train_step_with_images(tiny_vl_model):
    """A VL step: PNG images -> pixel_values through the image processor; image-token counts are
    checked against the processor (a mismatch is a clear error)."""
    from actors.engines.processing import load_processor

    learner = _learner(tiny_vl_model, lr=1e-3)
    processor = load_processor(tiny_vl_model)
    vs = learner.vision
    images = [png_bytes(96, 64), png_bytes(64, 64, (0, 90, 200))]

    def step(img: bytes, idx: int, extra_image_token: bool = False) -> Step:
        out = vs.image_processor(images=[__import__("PIL.Image").Image.open(__import__("io").BytesIO(img))], return_tensors="pt")
        n = int(out["image_grid_thw"].prod() // vs.merge_size**2)
        tok = processor.tokenizer
        prompt = (tok.encode("<|im_start|>user\n<|vision_start|>") + [vs.image_token_id] * (n + extra_image_token)
                  + tok.encode("<|vision_end|>click<|im_end|>\n<|im_start|>assistant\n"))
        comp = tok.encode("click('3')")
        return Step(index=idx, prompt_ids=prompt, completion_ids=comp, logprobs=[-2.0] * len(comp),
                    policy_version=0, images=[img])

    trajs = [Trajectory(episode_id=f"v{i}", group_id="vg", task="t", seed=0,
                        steps=[step(images[i % 2], 0)], episode_return=float(i % 2)) for i in range(4)]
    # Multimodal position ids computed on CPU ahead of the forward (as train_step does) give
    # exactly the logprobs of the model computing them itself.
    samples, _ = build_samples([TrajectoryGroup("vg", "t", 0, trajs)], learner.cfg)
    batch = collate(samples, learner.pad_token_id, False, vs, "cpu")
    assert learner._rope_index is not None
    positions = learner._rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                    image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])[0]
    assert positions.shape[0] == 3 and positions[0].max() < batch["input_ids"].shape[1]  # images compress positions
    with torch.no_grad():
        own, _ = learner._completion_logps(learner.model, batch, with_entropy=False)
        given, _ = learner._completion_logps(learner.model, {**batch, "position_ids": positions}, with_entropy=False)
        wrong, _ = learner._completion_logps(learner.model, {**batch, "position_ids": torch.zeros_like(positions)},
                                             with_entropy=False)
    assert torch.equal(own, given)
    assert not torch.allclose(own, wrong)  # the given positions are the ones used
    before = learner.get_weights()
    m = learner.train_step([TrajectoryGroup("vg", "t", 0, trajs)])
    assert m["samples"] == 4 and m["grad_norm"] > 0
    after = learner.get_weights()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("model.visual") for k in changed)  # gradients reached the vision tower

    bad = [Trajectory(episode_id=f"b{i}", group_id="bg", task="t", seed=0,
                      steps=[step(images[0], 0, extra_image_token=True)], episode_return=float(i)) for i in range(2)]
    with pytest.raises(BatchError, match="image tokens"):
        learner.train_step([TrajectoryGroup("bg", "t", 0, bad)])
    assert learner.policy_version == 1  # the bad batch changed nothing

    # A random model can sample the image placeholder token in its completion (seen on the GPU
    # loop); such a step is dropped and counted, the rest of the batch trains.
    odd = [Trajectory(episode_id=f"p{i}", group_id="pg", task="t", seed=0,
                      steps=[step(images[i % 2], 0)], episode_return=float(i % 2)) for i in range(4)]
    odd[0].steps[0].completion_ids.append(vs.image_token_id)
    odd[0].steps[0].logprobs.append(-3.0)
    m = learner.train_step([TrajectoryGroup("pg", "t", 0, odd)])
    assert m["dropped_placeholder_steps"] == 1 and m["samples"] == 3
    assert learner.policy_version == 2


# --- checkpoints ---------------------------------------------------------------------------


def test_resume_equals_uninterrupted(tiny_text_model, make_groups, deterministic_torch, tmp_path):
    """k=2 steps, checkpoint, a NEW learner resumes, n=2 more == 4 uninterrupted steps, exactly.
    Warm-up makes the scheduler state matter, weight decay and Adam moments the optimizer's."""
    kw = dict(lr=5e-3, warmup_steps=3, lr_schedule="cosine", total_steps=10, weight_decay=0.1,
              micro_batch_size=3)
    batches = [make_groups(seed=s) for s in range(4)]

    straight = _learner(tiny_text_model, **kw)
    for b in batches:
        straight.train_step(b)

    first = _learner(tiny_text_model, **kw)
    for b in batches[:2]:
        first.train_step(b)
    folder = first.save_checkpoint(tmp_path / "ckpt", data_cursor={"groups_consumed": 2})
    del first

    resumed = _learner(tiny_text_model, **kw)
    cursor = resumed.load_checkpoint(tmp_path / "ckpt")
    assert cursor == {"groups_consumed": 2} and resumed.policy_version == 2
    for b in batches[2:]:
        resumed.train_step(b)

    a, b = straight.get_weights(), resumed.get_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()

    # The checkpoint's model folder is a Hugging Face folder transformers loads on its own.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(Path(folder) / "model")
    AutoTokenizer.from_pretrained(Path(folder) / "model")
    ids = torch.tensor([[5, 6, 7, 8]])
    saved_version = _learner(tiny_text_model, **kw)
    saved_version.load_checkpoint(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, saved_version.model(input_ids=ids).logits)


_KILL_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    import learner.checkpoint as ckpt
    from learner.config import GRPOConfig, LearnerConfig
    from learner.learner import Learner
    from tests.fixtures.learner import synthetic_groups

    L = Learner(LearnerConfig(model_path={model!r}, lr=1e-2))
    L.save_checkpoint({root!r}, data_cursor={{"n": 0}})
    L.train_step(synthetic_groups(seed=0))

    real_fsync_tree = ckpt.fsync_tree
    def fsync_then_hang(path):
        real_fsync_tree(path)  # every file of the new checkpoint is written...
        print("MID-WRITE", flush=True)
        time.sleep(600)  # ...but not yet renamed into place: the parent kills us here
    ckpt.fsync_tree = fsync_then_hang
    L.save_checkpoint({root!r}, data_cursor={{"n": 1}})
    """
)


def test_checkpoint_killed_mid_write_leaves_previous_loadable(tiny_text_model, tmp_path):
    root = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD.format(repo=str(REPO), model=str(tiny_text_model), root=str(root)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "MID-WRITE" in line or (not line and proc.poll() is not None):
                break
        assert "MID-WRITE" in line, f"child never reached the save (rc={proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()

    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert partial, "the kill did not land mid-write"
    assert (root / "latest").read_text().strip() == "step-000000"

    learner = _learner(tiny_text_model, lr=1e-2)
    initial = learner.get_weights()
    cursor = learner.load_checkpoint(root)
    assert cursor == {"n": 0} and learner.policy_version == 0
    w = learner.get_weights()
    assert all(torch.equal(w[k], initial[k]) for k in w)
    # The next save cleans the leftover and completes.
    learner.save_checkpoint(root, data_cursor={"n": 5})
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_checkpoint_errors_are_clear(tmp_path):
    from learner.checkpoint import CheckpointError, resolve

    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve(tmp_path)
    (tmp_path / "latest").write_text("step-000009\n")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        resolve(tmp_path)


def test_learner_config_validation():
    with pytest.raises(ValueError, match="model_path"):
        LearnerConfig().validate()
    with pytest.raises(ValueError, match="float32 on cpu"):
        LearnerConfig(model_path="x", dtype="bfloat16").validate()
    with pytest.raises(ValueError, match="micro_batch_size"):
        LearnerConfig(model_path="x", micro_batch_size=0).validate()


@pytest.mark.parametrize("sizes", [[(96, 64), (64, 64), (64, 96)], [(96, 64)] * 3], ids=["mixed", "equal"])
def test_packed_vision_attention_matches_transformers(tiny_vl_model, sizes):
    """learner/vision.py: the vision tower's attention over all images in one call, with its grid
    inputs computed on CPU, gives transformers' per-image logprobs and gradients, for images of
    mixed sizes (padded with a key mask) and of one size (a reshape)."""
    from learner.vision import PACKED_VISION_ATTENTION, VISION_KWARGS, vision_precompute

    plain = _learner(tiny_vl_model, packed_vision_attention=False)
    packed = _learner(tiny_vl_model)
    assert plain.packed_vision_layers == 0
    assert packed.packed_vision_layers == packed.model.config.vision_config.depth
    assert packed.model.config.vision_config._attn_implementation == PACKED_VISION_ATTENTION
    assert packed.model.config.text_config._attn_implementation == "sdpa"  # the text model keeps its own

    samples, _ = build_samples([vl_group(packed, sizes)], packed.cfg)
    batch = collate(samples, packed.pad_token_id, False, packed.vision, "cpu")
    extra = vision_precompute(packed._vision_tower, batch["image_grid_thw"])
    assert set(extra) == set(VISION_KWARGS)
    assert extra["image_max_seqlen"] == int(batch["image_grid_thw"].prod(-1).max())

    def logps_and_grad(learner, b):
        learner.model.zero_grad(set_to_none=True)
        logps, _ = learner._completion_logps(learner.model, b, with_entropy=False)
        logps.sum().backward()
        grad = learner.model.model.visual.blocks[0].attn.qkv.weight.grad.clone()
        return logps.detach(), grad

    from transformers import AttentionInterface
    from learner.vision import packed_vision_attention

    calls = []

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape)
        return packed_vision_attention(module, query, *args, **kwargs)

    ref, ref_grad = logps_and_grad(plain, batch)
    AttentionInterface.register(PACKED_VISION_ATTENTION, counted)
    try:
        out, grad = logps_and_grad(packed, {**batch, **extra})
    finally:
        AttentionInterface.register(PACKED_VISION_ATTENTION, packed_vision_attention)
    # one call per block for all images together
    assert len(calls) == packed.model.config.vision_config.depth
    assert calls[0][2] == int(batch["image_grid_thw"].prod(-1).sum())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert ref_grad.abs().sum() > 0
    # The precomputed inputs are the ones used: wrong position ids change the result.
    wrong = {**extra, "image_position_ids": torch.zeros_like(extra["image_position_ids"])}
    with torch.no_grad():
        moved, _ = packed._completion_logps(packed.model, {**batch, **wrong}, with_entropy=False)
    assert not torch.allclose(moved, ref, atol=1e-4)


def _compiled_frames(model: torch.nn.Module) -> dict[str, int]:
    """Dynamo's cache entries on each compiled layer class's own forward (per layer class name):
    frames compiled from this model's layers since the last torch._dynamo.reset(), unlike the
    process-wide counters, which any earlier compile in the session has already raised."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    classes = {type(m) for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "VisionBlock"))}
    return {c.__name__: len(_debug_get_cache_entry_list(c.forward.__code__)) for c in classes}


def test_compiled_vl_learner_trains_like_eager(tiny_vl_model):
    """learner.compile on a VL model compiles the vision blocks too (with the packed vision
    attention they have no graph break); a step on mixed-size images matches eager."""
    import torch._dynamo

    torch._dynamo.reset()  # forget earlier tests' compiled frames: what is counted below is ours
    losses = {}
    for c in (False, True):
        learner = _learner(tiny_vl_model, lr=1e-3, compile=c, seed=0)
        cfg = learner.model.config
        assert learner.compiled_layers == (cfg.text_config.num_hidden_layers + cfg.vision_config.depth if c else 0)
        m = learner.train_step([vl_group(learner, [(96, 64), (64, 64), (64, 96), (96, 64)])])
        losses[c] = (m["loss"], m["grad_norm"])
        assert ("compiled_graphs" in m) == c and m.get("compiled_graphs", 1) > 0
        # Both the decoder layers and the vision blocks ran as compiled frames (none when eager).
        frames = _compiled_frames(learner.model)
        assert len(frames) == 2 and all((n > 0) == c for n in frames.values()), frames
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)


def test_compiled_layers_train_like_eager(tiny_text_model, make_groups):
    """learner.compile: every decoder layer goes through torch.compile (inductor), and three
    steps give the same losses and weights as the eager learner (float32 on CPU; 1e-4 allows
    the fused kernels' different summation order)."""
    import torch._dynamo

    torch._dynamo.reset()  # forget earlier tests' compiled frames: what is counted below is ours
    groups = make_groups(11)
    learners = {c: _learner(tiny_text_model, lr=1e-3, micro_batch_size=3, compile=c, seed=0) for c in (False, True)}
    assert learners[True].compiled_layers == learners[True].model.config.num_hidden_layers
    assert learners[False].compiled_layers == 0
    start = [p.detach().clone() for p in learners[False].model.parameters()]
    for _ in range(3):
        m = {c: lr.train_step(groups) for c, lr in learners.items()}
        assert m[True]["loss"] == pytest.approx(m[False]["loss"], rel=1e-4, abs=1e-6)
    # Adam turns a rounding-level gradient difference on a near-zero gradient into a full-size
    # step, so compare whole updates: the two runs' weights differ by < 0.1% of how far they moved.
    eager, compiled = learners[False].model.parameters(), learners[True].model.parameters()
    moved = torch.cat([(a.detach() - s0).flatten() for a, s0 in zip(eager, start)])
    apart = torch.cat([(b.detach() - a.detach()).flatten() for a, b in zip(learners[False].model.parameters(), compiled)])
    print("compile vs eager weight distance / update:", float(apart.norm() / moved.norm()))
    assert moved.norm() > 0 and apart.norm() < 1e-3 * moved.norm(), (apart.norm(), moved.norm())
    # The layers really ran compiled: dynamo holds compiled frames of this model's decoder layer
    # forward (built in this test: the cache was reset above).
    frames = _compiled_frames(learners[True].model)
    assert len(frames) == 1 and all(n > 0 for n in frames.values()), frames
