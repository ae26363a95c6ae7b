"""A hung env server (SIGSTOP: the process lives but never answers) times out its episode, is
replaced, and the group's re-run succeeds. Slow: it waits out a real step timeout and a restart."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from core.trajectory import FAILED, FINISHED, TRUNCATED, read_trajectories
from tests.fixtures.rollout import small_rollout_config

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_hung_env_server_times_out_and_is_replaced(rollout_engine_config, rollout_env_config, tmp_path):
    from actors.rollout_worker import RolloutWorker

    cfg = small_rollout_config(num_sessions=1, max_steps=3, step_timeout_s=20.0)
    with RolloutWorker("hang", cfg, rollout_engine_config, rollout_env_config, tmp_path) as worker:
        victim = worker.env_server_pids()[0]
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("g", worker.run_group("miniwob.click-test", 41, 2)))
        thread.start()
        deadline = time.monotonic() + 300
        while worker.stats()["steps"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim, signal.SIGSTOP)
        try:
            thread.join(timeout=900)
        finally:
            try:
                os.kill(victim, signal.SIGCONT)  # let it be killed/reaped normally if still there
            except ProcessLookupError:
                pass
        assert not thread.is_alive()
        st = worker.stats()
        assert st["balanced"] and st["env_restarts"] >= 1 and st["groups_rerun"] == 1
        assert "env_timeout" in st["failure_reasons"]
        assert worker.env_server_pids()[0] != victim
        assert all(t.status in (FINISHED, TRUNCATED) for t in result["g"].trajectories)
    failed = [t for g in read_trajectories(tmp_path / "trajectories") for t in g.trajectories if t.status == FAILED]
    assert any(t.failure_reason.startswith("env_timeout") for t in failed)
