"""The browser-free `recorded.click-button` environment: its rules in-process, the same server,
pool and WebSocket client as BrowserGym with no browser started, config validation, and a
colocated training run (driver, Ray workers, learner) on it (the plain run is
tests/test_run_outputs.py's). It is what GPU machines without
Chromium run; here it also gives a fast end-to-end check of everything but the browser."""

from __future__ import annotations

import pytest

from cluster import config as C
from envs.browsergym.config import EnvConfig
from envs.browsergym.models import BrowserGymAction
from envs.recorded.environment import BUTTONS, RecordedEnvironment

TASK = "recorded.click-button"


def target_bid(obs) -> str:
    return next(b["bid"] for b in BUTTONS if f'"{b["text"]}"' in obs.goal)


def test_reset_is_seeded_and_shows_the_recorded_page():
    env = RecordedEnvironment(EnvConfig(task=TASK))
    goals = {seed: env.reset(seed=seed).goal for seed in range(12)}
    assert goals == {seed: env.reset(seed=seed).goal for seed in range(12)}  # same seed, same goal
    assert len(set(goals.values())) == 3  # every button is a target for some seed
    obs = env.reset(seed=0)
    assert obs.screenshot_png_b64.startswith("iVBORw0KGgo")  # a PNG
    assert [e["bid"] for e in obs.clickable_elements] == ["13", "14", "15"]
    assert not obs.done and obs.step_count == 0 and obs.task_name == TASK


def test_rewards_errors_and_truncation():
    env = RecordedEnvironment(EnvConfig(task=TASK, max_steps=3))
    obs = env.reset(seed=5)
    win = env.step(BrowserGymAction(action_str=f"click('{target_bid(obs)}')"))
    assert (win.reward, win.done, win.terminated, win.last_action_error) == (1.0, True, True, False)
    assert env.state.cum_reward == 1.0

    obs = env.reset(seed=5)
    other = next(b["bid"] for b in BUTTONS if b["bid"] != target_bid(obs))
    lose = env.step(BrowserGymAction(action_str=f'click("{other}")'))
    assert (lose.reward, lose.done, lose.terminated) == (0.0, True, True)
    after = env.step(BrowserGymAction(action_str="noop()"))
    assert after.last_action_error and "episode is over" in after.error

    env.reset(seed=5)
    for text in ("Let me think", "__import__('os').system('true')", "click('99')"):
        obs = env.step(BrowserGymAction(action_str=text))
        assert obs.last_action_error and obs.reward == 0.0, text
    # three steps taken: the third hit max_steps
    assert obs.done and obs.truncated and not obs.terminated
    env.reset(seed=5)
    unknown = env.step(BrowserGymAction(action_str="explode()"))
    assert unknown.last_action_error and "unknown action" in unknown.error and not unknown.done
    noop = env.step(BrowserGymAction(action_str="noop(0)"))
    assert not noop.last_action_error and not noop.done


def test_bad_reset_arguments():
    env = RecordedEnvironment(EnvConfig(task=TASK))
    with pytest.raises(ValueError, match="replays recorded.click-button only"):
        env.reset(seed=1, task="miniwob.click-test")
    with pytest.raises(ValueError, match="seed must be"):
        env.reset(seed=-1)


def test_served_over_websocket_without_a_browser():
    from envs.browsergym.client import BrowserGymEnvClient
    from envs.browsergym.pool import SERVER_TAG_VAR, EnvServerPool, find_tagged_processes

    with EnvServerPool(num_servers=1, env_config=EnvConfig(task=TASK)) as pool:
        with BrowserGymEnvClient(pool.urls[0]) as client:
            obs = client.reset(seed=3, task=TASK).observation
            result = client.step(BrowserGymAction(action_str=f"click('{target_bid(obs)}')"))
            assert result.reward == 1.0 and result.done
            # nothing but the server process itself carries the server's tag: no browser started
            tagged = set(find_tagged_processes(SERVER_TAG_VAR, pool._servers[0].tag))
            assert tagged == {pool.pids[0]}


def test_config_must_name_one_kind_of_task():
    base = {"sampler.tasks": f"[{TASK}]", "warm_start.enabled": "false"}
    with pytest.raises(C.ConfigError, match=f"set --env.task {TASK}"):
        C.validate_config(C.build_config("local", base, environ={}))
    with pytest.raises(C.ConfigError, match="mixes recorded"):
        C.validate_config(C.build_config("local", {"sampler.tasks": f"[{TASK},click-test]", "env.task": TASK,
                                                   "warm_start.enabled": "false"}, environ={}))
    C.validate_config(C.build_config("local", {**base, "env.task": TASK}, environ={}))


def recorded_config(run_dir, **overrides) -> C.TrainConfig:
    from tests.test_e2e import SMOKE  # the old smoke settings of the local preset (tiny VLM, no warm start)

    cfg = C.build_config("local", {
        **SMOKE, "model": "tiny-vlm",
        "cluster.run_dir": str(run_dir), "eval.at_end": "false", "logging.progress_bar": "false",
        "sampler.tasks": f"[{TASK}]", "env.task": TASK, "cluster.total_steps": "2",
        **{k: str(v) for k, v in overrides.items()},
    }, environ={})
    C.validate_config(cfg)
    return cfg


def test_colocated_run_sleeps_the_engine_while_the_learner_trains(ray_cluster, tmp_path):
    """cluster.colocate in a sync run: learner rank 0 and the rollout worker share one bundle,
    the worker's engine is put to sleep for every learner step and woken before the new weights
    load (on CPU the transformers engine has no memory to free, so this checks the sequence)."""
    from cluster import driver

    run_dir = tmp_path / "run"
    cfg = recorded_config(run_dir, **{"cluster.colocate": "true", "cluster.num_rollout_workers": 1,
                                      "cluster.run_name": "colocated"})
    assert cfg.learner.release_memory_after_step  # derived from cluster.colocate
    summary = driver.train(cfg, run_dir)
    assert summary["steps"] == 2 and summary["worker_versions"] == [2]
    assert [w["engine_sleeps"] for w in summary["worker_stats"]] == [2]
    assert summary["accounting"]["balanced"]
    import json

    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["engine_sleeps"] for r in steps if "engine_sleeps" in r] == [1.0, 1.0]  # one per step


# The plain training run on this env (2 Ray rollout workers, env servers as subprocesses, the tiny
# VLM, the learner) is tests/test_run_outputs.py's module run; its
# `test_training_run_on_the_recorded_env` checks what a separate 2-step run here used to.
