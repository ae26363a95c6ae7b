"""The BrowserGym env served over OpenEnv's WebSocket, with real Chromium (one shared server)."""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests

from envs.browsergym.client import BrowserGymEnvClient, EnvServerError
from envs.browsergym.models import BrowserGymAction
from envs.browsergym.scripted import SCRIPTED_TASKS, run_scripted_episode
from tests.test_env_actions import hostile_actions

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def client(env_server_pool):
    env_server_pool.ensure_alive()
    client = BrowserGymEnvClient(env_server_pool.urls[0], connect_timeout_s=10, message_timeout_s=60)
    yield client
    client.close()


@pytest.mark.parametrize("task", SCRIPTED_TASKS)
def test_scripted_policy_solves_task_over_websocket(client, task):
    steps = []
    reward, actions = run_scripted_episode(client, task, seed=7, on_step=lambda a, r: steps.append(r))
    assert reward == 1.0, (task, actions, [s.observation.error for s in steps])
    assert steps[-1].done and steps[-1].observation.terminated and not steps[-1].observation.truncated
    assert all(not s.observation.last_action_error for s in steps)


def test_same_seed_same_goal_and_page_different_seeds_differ(client):
    first = client.reset(seed=123, task="miniwob.enter-text").observation
    again = client.reset(seed=123, task="miniwob.enter-text").observation
    other = client.reset(seed=124, task="miniwob.enter-text").observation
    assert first.goal == again.goal and first.axtree_txt == again.axtree_txt
    assert first.seed == again.seed == 123
    assert other.goal != first.goal  # enter-text draws a random word per seed


def test_observation_carries_what_an_agent_needs(client):
    from PIL import Image

    result = client.reset(seed=5, task="miniwob.click-button")
    observation = result.observation
    assert not result.done and result.reward == 0.0
    assert observation.task_name == "miniwob.click-button" and observation.seed == 5
    assert observation.step_count == 0 and observation.goal.startswith("Click on the")
    assert observation.url.startswith("file://") and observation.url.endswith("click-button.html")
    assert observation.text == observation.axtree_txt and "button" in observation.axtree_txt
    assert 'bid="' in observation.pruned_html
    image = Image.open(io.BytesIO(base64.b64decode(observation.screenshot_png_b64)))
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert observation.screenshot is None  # upstream's nested-list screenshot is off by default
    buttons = [e for e in observation.clickable_elements if e["role"] == "button"]
    assert buttons and all(set(e) == {"bid", "role", "tag", "text", "bbox"} for e in observation.clickable_elements)
    for element in buttons:
        x, y, w, h = element["bbox"]
        assert w > 0 and h > 0 and f"[{element['bid']}] button" in observation.axtree_txt
    step = client.step(BrowserGymAction(action_str=f"click('{buttons[0]['bid']}')")).observation
    assert step.step_count == 1 and step.last_action == f"click('{buttons[0]['bid']}')"
    state = client.state()
    assert state.task_name == "miniwob.click-button" and state.step_count == 1 and state.seed == 5


def test_hostile_actions_are_recorded_errors_and_the_server_keeps_serving(client, env_server_pool, tmp_path):
    canary = tmp_path / "CANARY"
    actions = hostile_actions(str(canary))
    assert len(actions) >= 20
    result = client.reset(seed=1, task="miniwob.click-test")
    for action in actions:
        if result.done:  # max_steps=8 in the test config
            result = client.reset(seed=1, task="miniwob.click-test")
        steps_before = result.observation.step_count
        result = client.step(BrowserGymAction(action_str=action))
        observation = result.observation
        assert observation.last_action_error, action[:80]
        assert "InvalidActionError" in observation.error, (action[:80], observation.error)
        assert observation.step_count == steps_before + 1
        assert result.reward == 0.0
    assert not canary.exists()
    # Same session, still healthy: the task can still be solved.
    reward, _ = run_scripted_episode(client, "miniwob.click-test", seed=2)
    assert reward == 1.0
    assert env_server_pool.ensure_alive() == []


def test_episode_is_truncated_at_max_steps_and_then_refuses_steps(client):
    result = client.reset(seed=3, task="miniwob.click-test")
    for _ in range(8):  # max_steps of the test config
        assert not result.done
        result = client.step("noop(0)")  # noop() alone waits 1 s
    assert result.done and result.observation.truncated and not result.observation.terminated
    after = client.step("noop(0)")
    assert after.done and after.observation.last_action_error and "call reset" in after.observation.error


def test_unknown_task_and_bad_seed_are_clear_errors_and_session_survives(client):
    with pytest.raises(EnvServerError, match="unknown task 'miniwob.no-such-task'"):
        client.reset(seed=1, task="miniwob.no-such-task")
    with pytest.raises(EnvServerError, match="seed must be an integer"):
        client.reset(seed=-1, task="miniwob.click-test")
    with pytest.raises(EnvServerError, match="unknown reset arguments: colour"):
        client.reset(seed=1, colour="red")
    assert client.reset(seed=1, task="click-test").observation.goal == "Click the button."


def test_step_before_reset_is_a_recorded_error(env_server_url):
    with BrowserGymEnvClient(env_server_url, message_timeout_s=30) as fresh:
        result = fresh.step("click('13')")
        assert result.observation.last_action_error and "reset" in result.observation.error


def test_malformed_websocket_messages_do_not_stop_the_server(env_server_url):
    from websockets.sync.client import connect

    ws_url = env_server_url.replace("http://", "ws://") + "/ws"
    with connect(ws_url, open_timeout=10, close_timeout=5) as ws:
        for raw in ["{not json", json.dumps({"type": "teleport"}), json.dumps({"type": "step", "data": {"action_str": 5}}),
                    json.dumps({"type": "step", "data": {"action": "click('1')"}})]:
            ws.send(raw)
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] == "error", raw
    # Invalid UTF-8 in a binary frame: the server drops this session only.
    with connect(ws_url, open_timeout=10, close_timeout=5) as ws:
        ws.send(b"\xff\xfe\xfa")
        try:
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] == "error"
        except Exception as e:  # the session may simply be closed
            assert "close" in type(e).__name__.lower() or "close" in str(e).lower(), e
    assert requests.get(f"{env_server_url}/health", timeout=10).status_code == 200
    with BrowserGymEnvClient(env_server_url, message_timeout_s=60) as fresh:
        assert fresh.reset(seed=1, task="miniwob.click-test").observation.goal == "Click the button."


def test_stateless_http_reset_and_step_are_refused(env_server_url):
    for path in ("/reset", "/step"):
        response = requests.post(f"{env_server_url}{path}", json={}, timeout=10)
        assert response.status_code == 409 and "/ws" in response.json()["error"]
    assert requests.get(f"{env_server_url}/health", timeout=10).status_code == 200


def test_an_upstream_style_generic_client_can_drive_the_server(env_server_url):
    # openenv's GenericEnvClient sends plain dicts and reads plain dicts, as an upstream client would.
    from openenv.core.generic_client import GenericEnvClient

    with GenericEnvClient(base_url=env_server_url, message_timeout_s=60).sync() as generic:
        first = generic.reset(seed=4, task_name="click-test")
        observation = first.observation
        for field in ("text", "url", "screenshot", "goal", "axtree_txt", "pruned_html", "error", "last_action_error"):
            assert field in observation, field
        bid = next(e["bid"] for e in observation["clickable_elements"] if e["role"] == "button")
        result = generic.step({"action_str": f"click('{bid}')"})
        assert result.reward == 1.0 and result.done


def test_two_sessions_interleave_on_one_server_and_a_third_is_refused(client, env_server_url):
    # The module's client holds one session; the server accepts two (max_sessions=2 in the test config).
    with BrowserGymEnvClient(env_server_url, message_timeout_s=60) as second:
        a = client.reset(seed=8, task="miniwob.click-test").observation
        b = second.reset(seed=8, task="miniwob.focus-text").observation
        assert (a.task_name, b.task_name) == ("miniwob.click-test", "miniwob.focus-text")
        with BrowserGymEnvClient(env_server_url, message_timeout_s=60) as third:
            with pytest.raises(EnvServerError, match="capacity"):
                third.reset(seed=1)
        from envs.browsergym.scripted import scripted_action

        rb = second.step(scripted_action(b))
        ra = client.step(scripted_action(a))
        assert ra.reward == 1.0 and rb.reward == 1.0


def test_a_session_closed_by_the_idle_timeout_says_so_on_its_next_call():
    """env.session_timeout_s (off by default) lets openenv close a session idle that long; the
    client's next call then gets an error naming the setting, not a bare thread error. openenv's
    idle check runs every max(timeout / 4, 5) s, so 2 s of timeout and 8 s of idling."""
    import time

    from envs.browsergym.pool import EnvServerPool
    from tests.fixtures.env import fast_env_config

    assert fast_env_config().session_timeout_s is None  # the default keeps idle sessions
    with EnvServerPool(1, fast_env_config(session_timeout_s=2.0)) as pool:
        with BrowserGymEnvClient(pool.urls[0], connect_timeout_s=10, message_timeout_s=60) as client:
            assert client.reset(seed=1, task="miniwob.click-test").observation.goal
            time.sleep(8)
            with pytest.raises(EnvServerError, match="session_timeout_s"):
                client.reset(seed=2, task="miniwob.click-test")
