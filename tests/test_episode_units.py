"""Unit tests of the episode loop's bookkeeping (`actors.episode`): no browser, no Ray, no model.

The env is the browser-free recorded click-button environment in-process (the real one, with the
real action parser in front of it). The engine side is a scripted list of `Generation`s: these
tests check what the loop does with whatever the engine answers (recording, history, status,
return, failure reasons), not what a model would answer, and a real model would make every run
(and every mutant in scripts/mutation_test.py) take seconds. Env and engine failures (a dead
connection, a hung call) are raised by small wrappers: they cannot be caused for real in-process.
"""

from __future__ import annotations

import threading
import time

import pytest

from actors.action_parser import ActionParser
from actors.config import PromptConfig, RolloutConfig
from actors.engine import Generation, SamplingSettings
from actors.episode import (
    BatcherStats,
    EnvTimeout,
    GenerationBatcher,
    is_env_failure,
    run_episode,
)
from core.trajectory import FAILED, FINISHED, TRUNCATED
from envs.recorded.environment import BUTTONS
from tests.fixtures.recorded_session import RecordedSession

TASK = "recorded.click-button"
SEED = 5  # its goal names the "submit" button, bid 15


def _gen(text: str, version: int = 0, n: int = 2) -> Generation:
    return Generation(prompt_ids=[1, 2, 3], completion_ids=list(range(10, 10 + n)),
                      logprobs=[-0.5] * n, text=text, finish_reason="stop", policy_version=version,
                      temperature=0.7, top_k=5, top_p=0.9)


class Scripted:
    """The engine's answers, in order; records each request it got."""

    def __init__(self, texts: list[str], delay_s: float = 0.0, fail_at: int | None = None) -> None:
        self.texts, self.delay_s, self.fail_at = texts, delay_s, fail_at
        self.requests: list = []

    def __call__(self, request):
        self.requests.append(request)
        i = len(self.requests) - 1
        time.sleep(self.delay_s)
        if i == self.fail_at:
            raise RuntimeError("engine exploded")
        return _gen(self.texts[i], version=i)


def _run(env, generate, config: RolloutConfig | None = None, **kw):
    config = config or RolloutConfig(max_steps=4)
    parser = ActionParser(config.allowed_actions, fallback_action=config.fallback_action)
    return run_episode(env, generate, task=TASK, seed=SEED, episode_id="ep", group_id="grp",
                       config=config, parser=parser, worker_id="w1", **kw)


def _user_text(request) -> str:
    content = request.messages[1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


def test_finished_episode_records_every_step_and_its_shaped_return():
    target = next(b for b in BUTTONS if b["text"] == "submit")["bid"]
    engine = Scripted(["scroll(0, 100)", "I am not sure", f"Action: click('{target}')", "noop()"], delay_s=0.05)
    config = RolloutConfig(max_steps=4, invalid_action_penalty=0.5, step_penalty=0.1)
    traj = _run(RecordedSession(), engine, config)

    assert (traj.status, traj.failure_reason) == (FINISHED, "")
    assert (traj.episode_id, traj.group_id, traj.task, traj.seed, traj.worker_id) == ("ep", "grp", TASK, SEED, "w1")
    assert traj.goal == 'Click on the "submit" button.'
    assert len(engine.requests) == 3  # done after the click: the fourth answer is never asked for
    assert [s.index for s in traj.steps] == [0, 1, 2]
    assert [s.action for s in traj.steps] == ["scroll(0, 100)", "noop(0)", f"click('{target}')"]
    assert [s.parse_fallback for s in traj.steps] == [False, True, False]
    assert [s.reward for s in traj.steps] == [0.0, 0.0, 1.0]
    assert [s.done for s in traj.steps] == [False, False, True]
    assert [s.action_error for s in traj.steps] == ["", "", ""]
    assert [s.policy_version for s in traj.steps] == [0, 1, 2]
    s = traj.steps[2]
    assert (s.prompt_ids, s.completion_ids, s.logprobs) == ([1, 2, 3], [10, 11], [-0.5, -0.5])
    assert (s.completion_text, s.finish_reason) == (f"Action: click('{target}')", "stop")
    assert (s.temperature, s.top_k, s.top_p) == (0.7, 5, 0.9)
    # The screenshot goes with the prompt (include_screenshot is on by default) and is recorded.
    assert len(s.images) == 1 and s.images == engine.requests[2].images and s.images[0][:4] == b"\x89PNG"
    # Each step's time is its own call's: the engine's includes the scripted delay, and the parts
    # fit inside the episode's wall time (lower bounds and sums only: no bound depends on how fast
    # this machine is).
    assert all(x.engine_s >= 0.05 and x.env_s > 0 for x in traj.steps)
    assert traj.wall_s >= sum(x.engine_s + x.env_s for x in traj.steps) >= 0.15
    # Return: sum of (reward - step penalty - invalid penalty where the parser fell back).
    assert traj.episode_return == pytest.approx(-0.1 + (-0.1 - 0.5) + (1.0 - 0.1))
    # The third prompt numbers its step and carries the history of the first two.
    text = _user_text(engine.requests[2])
    assert "Step 3." in text and 'Goal: Click on the "submit" button.' in text
    assert "step 1: scroll(0, 100) -> reward 0\nstep 2: noop(0) -> reward 0" in text
    assert "History:\n(none)" in _user_text(engine.requests[0])


def test_episode_without_done_is_truncated_at_max_steps_under_the_configured_aggregation():
    engine = Scripted(["scroll(0, 1)", "gibberish", "scroll(0, 1)", "scroll(0, 1)"])
    config = RolloutConfig(max_steps=3, reward_aggregation="max", step_penalty=0.25, invalid_action_penalty=0.5)
    traj = _run(RecordedSession(), engine, config)
    assert traj.status == TRUNCATED and len(traj.steps) == 3 and len(engine.requests) == 3
    # Shaped rewards -0.25, -0.75, -0.25: max -0.25 (sum would be -1.25, mean -0.42).
    assert traj.episode_return == pytest.approx(-0.25)


class DictSession:
    """Observations as plain dicts (an older wire shape the loop still reads), scripted per call."""

    def __init__(self, reset_obs: dict, steps: list[tuple]) -> None:
        self.reset_obs, self.steps, self.actions = reset_obs, steps, []

    def reset(self, task: str, seed: int):
        self.reset_args = (task, seed)
        return self.reset_obs

    def step(self, action: str):
        self.actions.append(action)
        return self.steps[len(self.actions) - 1]


def test_done_at_reset_runs_no_step():
    engine = Scripted(["noop()"])
    env = DictSession({"goal": "nothing to do", "done": True}, [])
    traj = _run(env, engine)
    assert traj.status == FINISHED and traj.steps == [] and engine.requests == []
    assert traj.goal == "nothing to do" and traj.episode_return == 0.0
    assert env.reset_args == (TASK, SEED)
    # Without a goal field the goal is empty; without worker_id the trajectory names none.
    config = RolloutConfig()
    traj = run_episode(DictSession({"done": True}, []), engine, task=TASK, seed=1, episode_id="e2", group_id="g",
                       config=config, parser=ActionParser(config.allowed_actions))
    assert (traj.goal, traj.worker_id, traj.status) == ("", "", FINISHED)


def test_env_answers_are_normalised_and_long_errors_cut():
    env = DictSession({"goal": "g"}, [({"error": "  bad  " + "x" * 3000}, None, 0), ({}, 2, 1)])
    engine = Scripted(["click('1')", "click('2')"])
    traj = _run(env, engine)
    # The next prompt's history says the action failed, and why (cut to 120 characters).
    assert f"step 1: click('1') -> reward 0 (error: bad  {'x' * 115})" in _user_text(engine.requests[1])
    assert env.actions == ["click('1')", "click('2')"]
    first, second = traj.steps
    assert first.reward == 0.0 and isinstance(first.reward, float) and first.done is False
    assert len(first.action_error) == 2000 and first.action_error.startswith("bad ")
    assert second.reward == 2.0 and second.done is True and traj.status == FINISHED
    assert traj.episode_return == 2.0


class Broken(RecordedSession):
    """The recorded env whose reset or n-th step raises `exc` (a dead or hung server)."""

    def __init__(self, exc: BaseException, fail_reset: bool = False, fail_step: int = 0) -> None:
        super().__init__()
        self.exc, self.fail_reset, self.fail_step, self.n = exc, fail_reset, fail_step, 0

    def reset(self, task: str, seed: int):
        if self.fail_reset:
            raise self.exc
        return super().reset(task, seed)

    def step(self, action: str):
        self.n += 1
        if self.n > self.fail_step:
            raise self.exc
        return super().step(action)


@pytest.mark.parametrize("env, is_timeout, reason", [
    (lambda: Broken(ConnectionError("gone"), fail_step=1), None,
     "env_error: step at step 1: ConnectionError: gone"),
    (lambda: Broken(EnvTimeout("slow"), fail_reset=True), None,
     "env_timeout: reset at step 0: EnvTimeout: slow"),
    (lambda: Broken(ConnectionError("hung"), fail_step=0), lambda e: "hung" in str(e),
     "env_timeout: step at step 0: ConnectionError: hung"),
])
def test_env_failures_fail_the_episode_with_their_kind(env, is_timeout, reason):
    kw = {"is_timeout": is_timeout} if is_timeout else {}
    traj = _run(env(), Scripted(["scroll(0, 1)"] * 4), **kw)
    assert (traj.status, traj.failure_reason, traj.episode_return) == (FAILED, reason, None)  # no return: never scored
    assert is_env_failure(traj)
    assert traj.wall_s > 0


def test_engine_failure_and_episode_timeout_are_not_env_failures(caplog):
    with caplog.at_level("WARNING", logger="actors.episode"):
        traj = _run(RecordedSession(), Scripted(["scroll(0, 1)"] * 4, fail_at=1))
    # The worker's log names the episode, its task and seed, and the reason.
    assert [r.getMessage() for r in caplog.records] == [
        f"episode ep ({TASK} seed {SEED}) failed: engine_error: step 1: RuntimeError: engine exploded"]
    assert traj.status == FAILED and traj.failure_reason == "engine_error: step 1: RuntimeError: engine exploded"
    assert len(traj.steps) == 1 and not is_env_failure(traj)

    slow = Scripted(["scroll(0, 1)"] * 4, delay_s=0.06)
    traj = _run(RecordedSession(), slow, RolloutConfig(max_steps=4, episode_timeout_s=0.05))
    assert traj.failure_reason == "episode_timeout: over 0.05s after 1 steps" and len(slow.requests) == 1
    assert not is_env_failure(traj)


def test_failure_reason_is_capped():
    traj = _run(Broken(ConnectionError("z" * 5000)), Scripted(["scroll(0, 1)"]))
    assert len(traj.failure_reason) == 2000 and traj.failure_reason.startswith("env_error: step at step 0:")


def test_prompt_options_reach_the_request():
    config = RolloutConfig(max_steps=1, prompt=PromptConfig(include_screenshot=False, include_axtree=True))
    engine = Scripted(["scroll(0, 1)"])
    traj = _run(RecordedSession(), engine, config)
    assert traj.steps[0].images == [] and "[15] button 'submit'" in engine.requests[0].messages[1]["content"]


# --- GenerationBatcher ------------------------------------------------------------------------


class GatedEngine:
    """An engine whose calls wait for `gate`; echoes each request's text; can refuse one request."""

    def __init__(self, refuse: str | None = None, short: bool = False, delay_s: float = 0.0) -> None:
        self.gate = threading.Event()
        self.delay_s = delay_s
        self.calls: list[list[str]] = []
        self.sampling: list = []
        self.refuse, self.short = refuse, short

    def generate(self, requests, sampling):
        texts = [r.messages[0]["content"] for r in requests]
        self.calls.append(texts)
        self.sampling.append(sampling)
        assert self.gate.wait(10)
        time.sleep(self.delay_s)
        if self.refuse in texts:
            raise ValueError(f"refused {self.refuse}")
        return [_gen(t) for t in texts][: len(texts) - self.short]


def _req(text: str):
    from actors.engine import ChatRequest

    return ChatRequest(messages=[{"role": "user", "content": text}])


def _submit(batcher, texts: list[str]) -> tuple[list, list[threading.Thread]]:
    out: list = [None] * len(texts)

    def one(i: int) -> None:
        try:
            out[i] = batcher.generate(_req(texts[i]))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    return out, threads


def _wait_for(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_prompts_arriving_while_engine_busy_share_the_next_call():
    engine = GatedEngine()
    sampling = SamplingSettings(temperature=0.3, max_new_tokens=4)
    b = GenerationBatcher(engine, sampling, timeout_s=10)
    try:
        first, t1 = _submit(b, ["a"])
        _wait_for(lambda: len(engine.calls) == 1)
        rest, t2 = _submit(b, ["b", "c", "d"])
        _wait_for(lambda: b.waiting() == 3)
        engine.gate.set()
        for t in t1 + t2:
            t.join(10)
        assert engine.calls[0] == ["a"] and sorted(engine.calls[1]) == ["b", "c", "d"] and len(engine.calls) == 2
        assert [g.text for g in first + rest] == ["a", "b", "c", "d"]  # each caller gets its own answer
        assert engine.sampling == [sampling, sampling]
        assert (b.stats.calls, b.stats.requests, b.stats.max_batch) == (2, 4, 3)
        assert b.stats.busy_s > 0 and b.waiting() == 0
    finally:
        b.close()


def test_a_refused_request_fails_only_its_own_episode():
    engine = GatedEngine(refuse="bad", delay_s=0.03)
    engine.gate.set()
    b = GenerationBatcher(engine, SamplingSettings(), timeout_s=10)
    try:
        with b.engine_lock:  # hold the engine so all three land in one call
            out, threads = _submit(b, ["ok1", "bad", "ok2"])
            _wait_for(lambda: b.waiting() == 3)
            assert engine.calls == []
        for t in threads:
            t.join(10)
        texts = {o.text if isinstance(o, Generation) else f"error: {o}" for o in out}
        assert texts == {"ok1", "ok2", "error: refused bad"}
        assert len(engine.calls) == 4 and all(len(c) == 1 for c in engine.calls[1:])
        assert (b.stats.calls, b.stats.requests, b.stats.max_batch) == (4, 6, 3)
        assert b.stats.busy_s >= 4 * 0.03  # the time of every call, the failed one included
    finally:
        b.close()


def test_a_short_answer_is_an_error_not_a_misrouted_generation():
    engine = GatedEngine(short=True)
    engine.gate.set()
    b = GenerationBatcher(engine, SamplingSettings(), timeout_s=10)
    try:
        with pytest.raises(RuntimeError, match="^engine returned 0 generations for 1 requests$"):
            b.generate(_req("x"))
    finally:
        b.close()


def test_timeout_and_close():
    engine = GatedEngine()
    b = GenerationBatcher(engine, SamplingSettings(), timeout_s=0.05)
    # A daemon thread: a worker that never closes its batcher can still exit.
    assert b._thread.daemon is True and b._thread.name == "generation-batcher"
    with pytest.raises(TimeoutError, match="^engine did not answer within 0.05s$"):
        b.generate(_req("slow"))
    engine.gate.set()  # the slow call ends (nobody waits for it any more)
    _wait_for(lambda: b.stats.calls == 1)
    with b.engine_lock:  # the next prompt stays queued, then close() fails it
        out, threads = _submit(b, ["queued"])
        _wait_for(lambda: b.waiting() == 1)
        closer = threading.Thread(target=b.close)
        closer.start()
        threads[0].join(5)
    closer.join(10)
    assert isinstance(out[0], RuntimeError) and str(out[0]) == "generation batcher closed"
    with pytest.raises(RuntimeError, match="^generation batcher is closed$"):
        b.generate(_req("late"))
    assert not b._thread.is_alive()
    assert BatcherStats() == BatcherStats(calls=0, requests=0, busy_s=0.0, max_batch=0)
