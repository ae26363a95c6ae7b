"""Tests that catch bugs planted one at a time (issue 14, item 12): the completion mask's
positions in a collated batch, and the per-step policy-version stamps of an episode whose
engine gets new weights mid-episode."""

from __future__ import annotations

import torch

from core.trajectory import Step, Trajectory, TrajectoryGroup
from learner.batching import build_samples, collate
from learner.config import GRPOConfig
from tests.fixtures.recorded_session import RecordedSession


def test_completion_mask_marks_exactly_the_completion_positions():
    PAD = 0
    steps = [([11, 12, 13], [21, 22], "stop"), ([14], [23, 24, 25, 26], "length"), ([15, 16], [27], "stop")]
    trajs = [Trajectory(episode_id=f"e{i}", group_id="g", task="t", seed=0, episode_return=float(i % 2),
                        steps=[Step(index=0, prompt_ids=p, completion_ids=c, logprobs=[-0.5 - j for j in range(len(c))],
                                    policy_version=0, finish_reason=f)])
             for i, (p, c, f) in enumerate(steps)]
    samples, _ = build_samples([TrajectoryGroup("g", "t", 0, trajs)], GRPOConfig(min_group_size=1))
    for mask_truncated in (False, True):
        batch = collate(samples, PAD, mask_truncated_completions=mask_truncated)
        T = batch["logits_to_keep"]
        assert T == 4
        completion_ids = batch["input_ids"][:, -T:]
        for i, s in enumerate(samples):
            c = len(s.completion_ids)
            # Mask ones sit exactly over the completion tokens (right-padded), nowhere else.
            expected = [1.0] * c + [0.0] * (T - c)
            if mask_truncated and s.truncated:
                expected = [0.0] * T
            assert batch["completion_mask"][i].tolist() == expected
            assert completion_ids[i, :c].tolist() == s.completion_ids
            assert batch["sampling_logps"][i, :c].tolist() == s.sampling_logprobs
            # The prompt ends right where the completion starts: position -T-1 is its last token.
            assert batch["input_ids"][i, -T - 1].item() == s.prompt_ids[-1]
            assert batch["attention_mask"][i].sum().item() == len(s.prompt_ids) + c


def test_weights_updated_mid_episode_stamp_later_steps_and_change_generation(tiny_text_model):
    from actors.action_parser import ActionParser
    from actors.config import PromptConfig, RolloutConfig
    from actors.engine import SamplingSettings
    from actors.engines import EngineConfig, create_engine
    from actors.episode import run_episode

    greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
    config = RolloutConfig(max_steps=3, sampling=greedy,
                           prompt=PromptConfig(include_screenshot=False, include_axtree=True))
    engine = create_engine(EngineConfig(model=str(tiny_text_model), backend="transformers", dtype="float32",
                                        max_model_len=2048))
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    torch.manual_seed(3)
    new_weights = {k: v + 0.5 * torch.randn_like(v) for k, v in original.items() if "embed_tokens" in k}
    old_weight_outputs = []

    def generate(request):
        if len(seen) == 1:  # before the second step: what the old weights say, then new weights
            old_weight_outputs.append(engine.generate([request], greedy)[0])
            engine.update_weights(1, new_weights)
        seen.append(request)
        return engine.generate([request], greedy)[0]

    seen: list = []
    try:
        traj = run_episode(RecordedSession(), generate, task="recorded.click-button", seed=5, episode_id="e",
                           group_id="g", config=config,
                           parser=ActionParser(config.allowed_actions, fallback_action=config.fallback_action))
    finally:
        engine.close()
    assert traj.status != "failed" and len(traj.steps) == 3, traj.failure_reason
    assert traj.policy_versions == [0, 1, 1]
    # The new weights changed what was generated for the same prompt.
    assert traj.steps[1].completion_ids != old_weight_outputs[0].completion_ids
    assert traj.steps[1].prompt_ids == old_weight_outputs[0].prompt_ids
