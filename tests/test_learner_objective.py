"""The learner's objective knobs run for real on a tiny model: num_iterations (TRL's mu) and the
KL term against a reference model (beta > 0)."""

from __future__ import annotations

import torch

from learner.config import GRPOConfig, LearnerConfig


def _learner(model_path, lr: float = 1e-2, **grpo):
    from learner.learner import Learner

    grpo.setdefault("num_generations", 4)
    # Synthetic groups carry random "engine" logprobs: the correction would mask them all.
    grpo.setdefault("vllm_importance_sampling_correction", False)
    return Learner(LearnerConfig(model_path=str(model_path), lr=lr, micro_batch_size=4,
                                 grpo=GRPOConfig(**grpo)))


def _optimizer_steps(learner) -> int:
    return max(int(s["step"]) for s in learner.optimizer.state.values())


def test_num_iterations_takes_several_passes_and_clips(tiny_text_model, make_groups):
    groups = make_groups(seed=3)
    one = _learner(tiny_text_model, epsilon=0.05)
    m1 = one.train_step(groups)
    # One pass: the old policy is the current one, the ratio is exactly 1, nothing clips.
    assert m1["clip_ratio/region_mean"] == 0.0 and _optimizer_steps(one) == 1

    two = _learner(tiny_text_model, epsilon=0.05, num_iterations=2)
    m2 = two.train_step(groups)
    assert _optimizer_steps(two) == 2
    assert two.policy_version == 1 and m2["policy_version"] == 1.0 and two.step == 1
    # The second pass scores moved weights against the first pass's logprobs: clipping acts.
    assert m2["clip_ratio/region_mean"] > 0
    assert m2["clip_ratio/low_mean"] + m2["clip_ratio/high_mean"] > 0
    # Counts are of one pass, not doubled.
    assert m2["tokens"] == m1["tokens"] and m2["samples"] == m1["samples"]
    w1, w2 = one.get_weights(), two.get_weights()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_kl_starts_at_zero_and_grows_reference_stays_frozen(tiny_text_model, make_groups):
    learner = _learner(tiny_text_model, beta=0.1)
    assert learner.ref_model is not None
    ref_before = {k: v.clone() for k, v in learner.ref_model.state_dict().items()}
    assert not any(p.requires_grad for p in learner.ref_model.parameters())
    optimized = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in learner.ref_model.parameters()}

    kls = [learner.train_step(make_groups(seed=s))["kl"] for s in range(4)]
    assert abs(kls[0]) < 1e-7  # policy == reference before the first update
    assert 0 < kls[1] < kls[2] < kls[3], kls  # lr 1e-2: the policy keeps moving away
    for k, v in learner.ref_model.state_dict().items():
        assert torch.equal(v, ref_before[k]), k


def test_fp32_output_layer_gives_float32_logits_under_bf16_autocast():
    from learner.logprobs import fp32_output_layer

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(256, 4000, bias=False)
    model.get_output_embeddings = lambda: model.lm_head
    hidden = torch.randn(3, 5, 256).to(torch.bfloat16)  # what a bf16 autocast body hands over
    reference = torch.nn.functional.linear(hidden.double(), model.lm_head.weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.lm_head(hidden)
    assert bf16.dtype == torch.bfloat16
    assert fp32_output_layer(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = model.lm_head(hidden)
    assert fp32.dtype == torch.float32
    err32 = (fp32.double() - reference).abs().max()
    err16 = (bf16.double() - reference).abs().max()
    assert err32 < 1e-4 and err16 > 100 * err32, (err32, err16)
    # Gradients still reach the weight and the hidden states.
    h = hidden.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.lm_head(h).sum().backward()
    assert h.grad is not None and model.lm_head.weight.grad is not None


def test_lora_trains_adapters_only_and_the_engine_generates_like_the_merged_model(
    tiny_text_model, make_groups
):
    import copy

    from actors.engine import ChatRequest, SamplingSettings
    from actors.engines import EngineConfig, create_engine
    from learner.config import LoraConfig
    from learner.learner import Learner

    learner = Learner(LearnerConfig(
        model_path=str(tiny_text_model), lr=5e-2, micro_batch_size=4,
        grpo=GRPOConfig(num_generations=4, vllm_importance_sampling_correction=False),
        lora=LoraConfig(enabled=True, r=4, alpha=8),
    ))
    trainable = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if not p.requires_grad}
    plain_before = learner.get_weights()  # lora_B starts at 0: merged == base weights

    for seed in range(2):
        learner.train_step(make_groups(seed=seed))

    for n, p in learner.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n  # base weights never move
    assert any(float(p.abs().sum()) > 0 for n, p in learner.model.named_parameters() if "lora_B" in n)

    # What the engine receives: the merged weights under the plain model's names.
    published = learner.get_weights()
    assert set(published) == set(plain_before)
    merged = copy.deepcopy(learner.model).merge_and_unload().eval()
    merged_state = merged.state_dict()
    for name, tensor in published.items():
        torch.testing.assert_close(tensor, merged_state[name], rtol=0, atol=1e-6)
    moved = [n for n in published if not torch.equal(published[n], plain_before[n])]
    assert moved and all("q_proj" in n or "k_proj" in n or "v_proj" in n or "o_proj" in n for n in moved)

    engine = create_engine(EngineConfig(model=str(tiny_text_model), backend="transformers", dtype="float32",
                                        max_model_len=256))
    try:
        engine.update_weights(1, published)
        greedy = SamplingSettings(temperature=0.0, max_new_tokens=12)
        gens = engine.generate([ChatRequest(messages=[{"role": "user", "content": c}])
                                for c in ("Click the button.", "Goal: enter text")], greedy)
    finally:
        engine.close()
    for gen in gens:
        ids = torch.tensor([gen.prompt_ids])
        with torch.no_grad():
            out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=len(gen.completion_ids), pad_token_id=0)
        assert out[0, ids.shape[1]:].tolist() == gen.completion_ids
