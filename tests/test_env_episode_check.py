"""An episode is the task it claims to be.

Upstream OpenEnv's BrowserGym server fixes its task when it starts (BROWSERGYM_TASK_NAME), drops a
reset argument it does not know and reports no seed; pointed at it, the client used to get a
click-checkboxes episode for `task='miniwob.click-dialog-2'` without a word. The servers here are
real OpenEnv servers (openenv-core's `create_app`, WebSocket sessions, uvicorn) around an
environment with upstream's behaviour: it serves one fixed task, ignores the task argument, and
names its task only in its state (benchmark + bare task name), never the seed. The pages it serves
are the recorded click-button page, so no browser is needed.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Any, Optional

import pytest

from envs.browsergym.client import BrowserGymEnvClient, EnvEpisodeMismatchError
from envs.browsergym.config import EnvConfig
from envs.browsergym.models import BrowserGymAction, BrowserGymObservation, BrowserGymState

RESETS: collections.Counter = collections.Counter()
"""Resets served, per fixed task (the servers run in this process)."""


def fixed_task_environment(task: str, report_task: bool = True) -> type:
    """An OpenEnv environment class behaving like upstream's BrowserGym server for `task`."""
    from openenv.core.env_server.interfaces import Environment

    from envs.recorded.environment import RecordedEnvironment

    benchmark, bare = task.split(".", 1)

    class FixedTaskEnvironment(Environment):
        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self) -> None:
            super().__init__()
            self._page = RecordedEnvironment(EnvConfig(task="recorded.click-button"))
            self._state = BrowserGymState(episode_id="", step_count=0, benchmark=benchmark,
                                          task_name=bare if report_task else "")

        # upstream's signature: `task` is not a parameter, so openenv drops it; task_name is ignored
        def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None,
                  task_name: Optional[str] = None) -> BrowserGymObservation:
            RESETS[task] += 1
            return self._upstream(self._page.reset(seed=seed))

        def step(self, action: BrowserGymAction, timeout_s: Optional[float] = None, **kw: Any) -> BrowserGymObservation:
            return self._upstream(self._page.step(action))

        @staticmethod
        def _upstream(obs: BrowserGymObservation) -> BrowserGymObservation:
            return obs.model_copy(update={"task_name": "", "seed": None})  # upstream reports neither

        @property
        def state(self) -> BrowserGymState:
            return self._state

        def close(self) -> None:
            self._page.close()

    return FixedTaskEnvironment


class FixedTaskServer:
    """uvicorn serving `create_app(fixed task env)` on 127.0.0.1 in a thread of this process."""

    def __init__(self, task: str, report_task: bool = True) -> None:
        import uvicorn
        from openenv.core.env_server.http_server import create_app

        app = create_app(fixed_task_environment(task, report_task), BrowserGymAction, BrowserGymObservation,
                         max_concurrent_envs=8)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def servers():
    started = {t: FixedTaskServer(t) for t in ("miniwob.click-checkboxes", "miniwob.click-dialog-2")}
    started["silent"] = FixedTaskServer("miniwob.click-test", report_task=False)
    yield started
    for s in started.values():
        s.close()


def test_a_server_that_cannot_switch_tasks_is_refused(servers):
    with BrowserGymEnvClient(servers["miniwob.click-checkboxes"].url, trust_unreported_seed=True) as client:
        with pytest.raises(EnvEpisodeMismatchError, match=r"asked for task 'miniwob.click-dialog-2', the server "
                                                          r"started 'miniwob.click-checkboxes'.*env_server_tasks"):
            client.reset(seed=3, task="miniwob.click-dialog-2")
        # its own task passes (checked through the state, where upstream names it)
        assert client.reset(seed=3, task="miniwob.click-checkboxes").observation.goal


def test_a_server_that_cannot_tell_is_refused(servers):
    with BrowserGymEnvClient(servers["silent"].url, trust_unreported_seed=True) as client:
        with pytest.raises(EnvEpisodeMismatchError, match="reports no task"):
            client.reset(seed=1, task="miniwob.click-test")
    with BrowserGymEnvClient(servers["miniwob.click-checkboxes"].url) as client:  # seed not trusted
        with pytest.raises(EnvEpisodeMismatchError, match="does not report the episode's seed.*env_server_trust_seed"):
            client.reset(seed=1, task="miniwob.click-checkboxes")


def test_our_server_reports_and_honours_task_and_seed(tmp_path):
    from envs.browsergym.pool import EnvServerPool

    with EnvServerPool(num_servers=1, env_config=EnvConfig(task="recorded.click-button")) as pool:
        with BrowserGymEnvClient(pool.urls[0]) as client:
            obs = client.reset(seed=7, task="recorded.click-button").observation
            assert (obs.task_name, obs.seed) == ("recorded.click-button", 7)
            with pytest.raises(EnvEpisodeMismatchError, match="started seed 8"):
                client._check_episode(client.reset(seed=8, task="recorded.click-button").observation,
                                      "recorded.click-button", 9)


def test_remote_placement_routes_each_task_to_its_servers(servers, rollout_engine_config, tmp_path):
    """A rollout worker given the fixed-task servers and which task each serves plays every group
    on a server of its task; without the map the same worker is refused, never silently wrong."""
    from actors.rollout_worker import RolloutWorker, group_failed
    from cluster.config import ClusterConfig
    from cluster.placement import remote_env_servers
    from tests.fixtures.rollout import small_rollout_config

    a, b = servers["miniwob.click-checkboxes"].url, servers["miniwob.click-dialog-2"].url
    cluster = ClusterConfig(num_rollout_workers=2, env_placement="remote", env_server_urls=[a, b],
                            env_server_tasks={a: ["click-checkboxes"], b: ["miniwob.click-dialog-2"]})
    worker_urls, url_tasks = remote_env_servers(cluster)
    assert worker_urls == [[a, b], [a, b]]  # every worker reaches a server of every task
    assert url_tasks == {a: ["miniwob.click-checkboxes"], b: ["miniwob.click-dialog-2"]}

    cfg = small_rollout_config(num_sessions=2, max_steps=1, write_parquet=False, write_viewer=False)
    RESETS.clear()
    with RolloutWorker("w0", cfg, rollout_engine_config, None, tmp_path, env_urls=worker_urls[0],
                       env_url_tasks=url_tasks, trust_unreported_seed=True) as worker:
        for task in ("miniwob.click-dialog-2", "miniwob.click-checkboxes", "miniwob.click-dialog-2"):
            group = worker.run_group(task, 5, 2)
            assert not group_failed(group), [t.failure_reason for t in group.trajectories]
    assert RESETS == {"miniwob.click-dialog-2": 4, "miniwob.click-checkboxes": 2}

    cfg = small_rollout_config(num_sessions=2, max_steps=1, write_parquet=False, write_viewer=False,
                               max_group_reruns=0)
    with RolloutWorker("w1", cfg, rollout_engine_config, None, tmp_path, env_urls=[a, b],
                       trust_unreported_seed=True) as worker:
        group = worker.run_group("miniwob.click-dialog-2", 5, 2)
    assert group_failed(group)
    assert any("EnvEpisodeMismatchError" in t.failure_reason and "click-checkboxes" in t.failure_reason
               for t in group.trajectories)


def test_config_checks_that_every_task_has_a_server():
    from cluster import config as C

    base = {"cluster.env_placement": "remote", "cluster.env_server_urls": "[http://a:1, http://b:1]",
            "sampler.tasks": "[click-test, click-button]"}
    C.validate_config(C.build_config("local", {**base, "cluster.env_server_tasks":
                                               "{http://a:1: [click-test], http://b:1: [click-button]}"}, environ={}))
    with pytest.raises(C.ConfigError, match=r"\['miniwob.click-button'\] are served by no URL"):
        C.validate_config(C.build_config("local", {**base, "cluster.env_server_tasks":
                                                   "{http://a:1: [click-test], http://b:1: [click-test]}"}, environ={}))
    with pytest.raises(C.ConfigError, match="not in cluster.env_server_urls"):
        C.validate_config(C.build_config("local", {**base, "cluster.env_server_tasks": "{http://c:1: [click-test]}"},
                                         environ={}))
