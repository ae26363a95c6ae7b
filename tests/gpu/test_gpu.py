"""GPU tests: vLLM on CUDA, NCCL weight sync, the learner in bf16 on CUDA.

Marked `gpu` and skipped where CUDA is absent (CI, the CPU machines); the device machine runs them
(README, "GPU path"). Everything is real: vLLM's CUDA engine, NCCL between two GPUs, Ray actors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SCREENSHOT = Path(__file__).resolve().parent.parent / "data" / "miniwob_click_button.png"


def _requests(n: int):
    from actors.engine import ChatRequest

    msgs = [
        {"role": "system", "content": "You control a web browser. Reply with one action."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Goal: click submit."}]},
    ]
    return [ChatRequest(messages=msgs, images=[SCREENSHOT.read_bytes()]) for _ in range(n)]


def _groups(gens, group_size: int, step: int):
    from core.trajectory import Step, Trajectory, TrajectoryGroup

    groups = []
    for g in range(len(gens) // group_size):
        gid = f"s{step}g{g}"
        trajs = []
        for i in range(group_size):
            gen = gens[g * group_size + i]
            r = float(i % 2)  # alternating returns: every group has variance, every step updates
            st = Step(index=0, prompt_ids=gen.prompt_ids, completion_ids=gen.completion_ids,
                      logprobs=gen.logprobs, policy_version=gen.policy_version,
                      images=[SCREENSHOT.read_bytes()], completion_text=gen.text, reward=r, done=True,
                      finish_reason=gen.finish_reason)
            trajs.append(Trajectory(f"{gid}e{i}", gid, "recorded", g, [st], episode_return=r))
        groups.append(TrajectoryGroup(gid, "recorded", g, trajs))
    return groups


def _get(refs, timeout: float = 300.0):
    """ray.get with a deadline: a stuck collective fails the test instead of hanging the run."""
    import ray

    return ray.get(refs, timeout=timeout)


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    env = {k: os.environ[k] for k in ("PYTHONPATH", "VLLM_WORKER_MULTIPROC_METHOD",
                                      "VLLM_USE_FLASHINFER_SAMPLER", "HF_HUB_OFFLINE") if k in os.environ}
    ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False,
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def _reference_logprobs(model, processor, gen, temperature: float = 1.0) -> torch.Tensor:
    """Transformers' teacher-forced logprobs of `gen`'s completion tokens (one screenshot prompt)."""
    from actors.engines.processing import image_inputs, mm_token_type_ids

    ids = torch.tensor([gen.prompt_ids + gen.completion_ids], device="cuda")
    extra = {k: v.cuda() for k, v in image_inputs(processor, [SCREENSHOT.read_bytes()]).items()}
    extra["mm_token_type_ids"] = mm_token_type_ids(ids, model.config.image_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0].float()
    P = len(gen.prompt_ids)
    logp = torch.log_softmax(logits[P - 1 : -1] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(gen.completion_ids, device="cuda")[:, None])[:, 0].cpu()


def test_vllm_cuda_logprobs_match_transformers(tiny_vl_model):
    """vLLM (bf16, CUDA) logprobs vs a transformers teacher-forced pass over the same ids.

    Tolerance: both run the same bf16 weights; vLLM's fused bf16 kernels and transformers' sdpa
    round differently (measured on an H200: max abs difference 0.107 on a tiny bf16 model, greedy
    argmax agreeing 48/48), so
    the bound is on the mean (0.05) and the max (0.3) absolute logprob difference, and the greedy
    tokens must agree where transformers' top-2 margin exceeds that max.
    """
    from actors.engine import SamplingSettings
    from actors.engines.config import EngineConfig
    from actors.engines.processing import load_processor
    from actors.engines.vllm_engine import VLLMEngine
    from transformers import AutoModelForImageTextToText

    engine = VLLMEngine(EngineConfig(model=str(tiny_vl_model), backend="vllm", dtype="bfloat16",
                                     gpu_memory_utilization=0.3, max_model_len=1024))
    try:
        temperature = 0.7
        gens = engine.generate(_requests(8), SamplingSettings(temperature=temperature, max_new_tokens=12, seed=3))
    finally:
        engine.close()
    processor = load_processor(tiny_vl_model)
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vl_model), dtype=torch.bfloat16).cuda().eval()
    diffs = []
    for g in gens:
        diffs.append((_reference_logprobs(model, processor, g, temperature) - torch.tensor(g.logprobs)).abs())
    d = torch.cat(diffs)
    print(f"vLLM vs transformers logprobs on CUDA: mean {d.mean():.4f} max {d.max():.4f} over {d.numel()} tokens")
    assert d.numel() > 0
    assert float(d.mean()) < 0.05 and float(d.max()) < 0.3


def test_vllm_sleep_frees_gpu_memory_and_wakes_with_its_weights(tiny_vl_model):
    """engine.enable_sleep_mode (cluster.colocate): sleep() gives the KV cache and weights' GPU
    memory back, generate is refused while asleep, wake_up() restores the same greedy output, and
    an object-store update after waking loads and moves the version."""
    from actors.engine import EngineError, SamplingSettings
    from actors.engines.config import EngineConfig
    from actors.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(EngineConfig(model=str(tiny_vl_model), backend="vllm", dtype="bfloat16",
                                     gpu_memory_utilization=0.3, max_model_len=1024, enable_sleep_mode=True))
    try:
        greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
        before = [g.completion_ids for g in engine.generate(_requests(2), greedy)]
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        free_asleep = torch.cuda.mem_get_info()[0]
        print(f"vLLM sleep released {(free_asleep - free_awake) / 2**30:.2f} GiB")
        assert free_asleep - free_awake > 1 << 30  # at least the KV cache (0.3 of the card) came back
        with pytest.raises(EngineError, match="asleep"):
            engine.generate(_requests(1), greedy)
        engine.wake_up()
        assert [g.completion_ids for g in engine.generate(_requests(2), greedy)] == before
        from safetensors.torch import load_file

        state = {}
        for f in sorted(Path(tiny_vl_model).glob("*.safetensors")):
            state.update(load_file(str(f)))
        engine.update_weights(1, state)
        assert engine.policy_version == 1
    finally:
        engine.close()


def test_learner_bf16_vl_step_on_cuda(tiny_vl_model):
    from actors.engine import Generation
    from learner.config import GRPOConfig, LearnerConfig
    from learner.learner import Learner

    learner = Learner(LearnerConfig(model_path=str(tiny_vl_model), device="cuda", dtype="bfloat16",
                                    gradient_checkpointing=True, lr=1e-3, micro_batch_size=2,
                                    grpo=GRPOConfig(num_generations=4)))
    from actors.engines.processing import load_processor, render_prompt

    rendered = render_prompt(load_processor(tiny_vl_model), _requests(1)[0])
    g = torch.Generator().manual_seed(0)
    gens = [Generation(prompt_ids=rendered.prompt_ids,
                       completion_ids=torch.randint(10, 600, (6,), generator=g).tolist(),
                       logprobs=[-6.0] * 6, text="", finish_reason="length", policy_version=0)
            for _ in range(8)]
    before = learner.parameters_digest()
    metrics = learner.train_step(_groups(gens, 4, 1))
    after = learner.parameters_digest()
    assert learner.policy_version == 1
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["tokens"] == 8 * 6
    assert before != after
    assert next(learner.model.parameters()).is_cuda


def test_packed_vision_attention_on_cuda_matches_transformers(tiny_vl_model):
    from learner.learner import Learner

    """learner/vision.py on CUDA in bf16 (SDPA's GPU kernels: flash for one image size, the masked
    kernel for mixed sizes): the logprobs stay within bf16 noise of transformers' per-image path."""
    from learner.batching import build_samples, collate, to_device
    from learner.config import LearnerConfig
    from learner.vision import vision_precompute
    from tests.fixtures.learner import vl_group

    learners = {p: Learner(LearnerConfig(model_path=str(tiny_vl_model), device="cuda", dtype="bfloat16",
                                         packed_vision_attention=p)) for p in (False, True)}
    packed = learners[True]
    for sizes in ([(96, 64), (64, 64), (64, 96)], [(96, 64)] * 3):
        samples, _ = build_samples([vl_group(packed, sizes)], packed.cfg)
        batch = collate(samples, packed.pad_token_id, False, packed.vision, "cpu")
        extra = vision_precompute(packed._vision_tower, batch["image_grid_thw"])
        with torch.no_grad():
            ref, _ = learners[False]._completion_logps(learners[False].model, to_device(batch, "cuda"), False)
            out, _ = packed._completion_logps(packed.model, to_device({**batch, **extra}, "cuda"), False)
        print(f"packed vs per-image logprobs, sizes {sizes}: max |diff| {(out - ref).abs().max().item():.4f}")
        assert (out - ref).abs().max() < 0.1, (out - ref).abs().max()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL weight sync needs 2 GPUs")
def test_nccl_sync_is_bitwise_equal_to_the_object_store_path(gpu_ray, tiny_vl_model, request):
    """Learner (GPU 0) -> vLLM engine (GPU 1) over NCCL: the engine's parameters after the sync are
    bitwise those that the object-store path loads for the same version, and differ from before."""
    import ray

    from actors.engine import SamplingSettings
    from actors.engines.config import EngineConfig
    from actors.engines.host import EngineHostActor
    from learner.config import GRPOConfig, LearnerConfig
    from learner.learner import LearnerActor
    from weightsync import make_weight_sync

    learner = LearnerActor.options(num_gpus=1).remote(LearnerConfig(
        model_path=str(tiny_vl_model), device="cuda", dtype="bfloat16", lr=1e-2, micro_batch_size=4,
        publish_dtype="bfloat16", grpo=GRPOConfig(num_generations=4)))
    engine = EngineHostActor.options(num_gpus=1).remote(EngineConfig(
        model=str(tiny_vl_model), backend="vllm", dtype="bfloat16", gpu_memory_utilization=0.3,
        max_model_len=1024))
    request.addfinalizer(lambda: [ray.kill(a) for a in (learner, engine)])  # free both GPUs
    nccl = make_weight_sync("nccl", learner, [engine], timeout_s=60.0, bucket_mb=0.05)
    nccl.setup()
    assert len(nccl.info["layout"]["bucket_numels"]) > 1  # several buckets on a tiny model

    d0 = _get(engine.weight_digest.remote())
    gens = _get(engine.generate.remote(_requests(8), SamplingSettings(temperature=1.0, max_new_tokens=8)))
    _get(learner.train_step.remote(_groups(gens, 4, 1)))  # the perturbation: a real update
    assert nccl.sync() == 1
    d_nccl = _get(engine.weight_digest.remote())
    assert _get(engine.policy_version.remote()) == 1 == _get(learner.get_policy_version.remote())
    assert d_nccl != d0, "the NCCL sync changed nothing"

    # A broadcast of another version than the one announced: the collective completes, the
    # engine refuses it (weights and version kept) and the group still works afterwards.
    from weightsync.nccl import NcclUpdate

    wrong = NcclUpdate(version=5, timeout_s=60.0)
    with pytest.raises(Exception, match="announced"):
        _get([learner.send_weights.remote("nccl", wrong), engine.receive_weights.remote(wrong)])
    assert _get(engine.policy_version.remote()) == 1 and _get(engine.weight_digest.remote()) == d_nccl
    assert nccl.sync() == 1

    assert make_weight_sync("object_store", learner, [engine], timeout_s=60.0).sync() == 1
    d_store = _get(engine.weight_digest.remote())
    changed = [n for n in d_nccl if d_nccl[n] != d_store[n]]
    assert not changed, f"NCCL and object-store paths loaded different bytes: {changed[:5]}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL weight sync needs 2 GPUs")
def test_nccl_sync_timeout_keeps_previous_version(gpu_ray, tiny_vl_model, request):
    """The engine waits for a broadcast the learner never sends: a clear error within the timeout,
    and the engine keeps serving with its previous weights and version."""
    import ray

    from actors.engine import SamplingSettings
    from actors.engines.config import EngineConfig
    from actors.engines.host import EngineHostActor
    from learner.config import LearnerConfig
    from learner.learner import LearnerActor
    from weightsync import make_weight_sync
    from weightsync.nccl import NcclUpdate

    learner = LearnerActor.options(num_gpus=1).remote(LearnerConfig(
        model_path=str(tiny_vl_model), device="cuda", dtype="bfloat16", publish_dtype="bfloat16"))
    engine = EngineHostActor.options(num_gpus=1).remote(EngineConfig(
        model=str(tiny_vl_model), backend="vllm", dtype="bfloat16", gpu_memory_utilization=0.3,
        max_model_len=1024))
    request.addfinalizer(lambda: [ray.kill(a) for a in (learner, engine)])  # free both GPUs
    make_weight_sync("nccl", learner, [engine], timeout_s=60.0, bucket_mb=0.05).setup()
    d0 = _get(engine.weight_digest.remote())
    with pytest.raises(Exception, match="timeout|did not complete"):
        _get(engine.receive_weights.remote(NcclUpdate(version=1, timeout_s=2.0)))
    assert _get(engine.policy_version.remote()) == 0
    assert _get(engine.weight_digest.remote()) == d0
    gens = _get(engine.generate.remote(_requests(2), SamplingSettings(max_new_tokens=4)))
    assert all(g.policy_version == 0 for g in gens)


def _version_logprob_gaps(model_path, gens, old_state: dict, new_state: dict):
    """|engine logprob - reference| of every token against the weights its version names (v0: old,
    v1: new), and of the v1 tokens against the old weights (what a wrong stamp would match)."""
    from transformers import AutoModelForImageTextToText

    from actors.engines.processing import load_processor

    processor = load_processor(model_path)
    model = AutoModelForImageTextToText.from_pretrained(str(model_path), dtype=torch.bfloat16).cuda().eval()
    refs = {}
    for name, weights in (("old", old_state), ("new", new_state)):
        model.load_state_dict(weights, strict=False)
        refs[name] = [_reference_logprobs(model, processor, g) for g in gens]
    own, other = [], []
    for i, g in enumerate(gens):
        n_old = g.token_versions.count(0)
        got = torch.tensor(g.logprobs)
        own += [(got[:n_old] - refs["old"][i][:n_old]).abs(), (got[n_old:] - refs["new"][i][n_old:]).abs()]
        other.append((got[n_old:] - refs["old"][i][n_old:]).abs())
    return torch.cat(own), torch.cat(other)


def test_inflight_update_on_cuda_stamps_every_token(tiny_vl_model):
    """`engine.weight_update: in_flight` on vLLM's CUDA engine (eager, the config's default): an update posted
    while a screenshot batch generates lands mid-call; every request's tokens are its old version
    then its new one, none lost, and the tokens after the switch have the new weights' logprobs
    (transformers, bf16, teacher-forced on the whole context) within the bf16 bound of
    test_vllm_cuda_logprobs_match_transformers, and clearly not the old weights'."""
    from safetensors.torch import load_file

    from actors.engine import SamplingSettings
    from actors.engines.config import EngineConfig
    from actors.engines.vllm_engine import VLLMEngine
    from tests.test_engines import _perturbed
    from tests.test_inflight_updates import post_update_mid_call

    state = {}
    for f in sorted(Path(tiny_vl_model).glob("*.safetensors")):
        state.update(load_file(str(f)))
    new_state = _perturbed(state, seed=1)
    engine = VLLMEngine(EngineConfig(model=str(tiny_vl_model), backend="vllm", dtype="bfloat16",
                                     gpu_memory_utilization=0.3, max_model_len=1024, weight_update="in_flight"))
    errors: list = []
    max_new = 200  # long enough on an H200 for the poster to catch the call mid-way
    try:
        thread = post_update_mid_call(engine, 1, new_state, errors)
        gens = engine.generate(_requests(8), SamplingSettings(temperature=1.0, max_new_tokens=max_new))
        thread.join(timeout=120)
        stats = engine.weight_update_stats()
    finally:
        engine.close()
    assert not errors, errors
    assert stats["weight_updates_mid_call"] == 1 and stats["weight_update_reprefill_tokens"] > 0
    for g in gens:
        n_old = g.token_versions.count(0)
        assert g.token_versions == [0] * n_old + [1] * (len(g.token_versions) - n_old), g.token_versions
        assert 3 <= n_old < len(g.completion_ids), (n_old, len(g.completion_ids))
        assert g.finish_reason == "stop" or len(g.completion_ids) == max_new
        assert g.policy_version == 0

    dn, do = _version_logprob_gaps(tiny_vl_model, gens, state, new_state)
    print(f"in-flight on CUDA: {sum(len(g.completion_ids) for g in gens)} tokens, idle "
          f"{stats['weight_update_idle_s']:.3f} s, re-prefilled {stats['weight_update_reprefill_tokens']}; "
          f"|logprob - own version's| mean {dn.mean():.4f} max {dn.max():.4f}, "
          f"new tokens vs old weights mean {do.mean():.4f}")
    assert float(dn.mean()) < 0.05 and float(dn.max()) < 0.3
    assert float(do.mean()) > 5 * float(dn.mean())
