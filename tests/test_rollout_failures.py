"""Failure accounting without browsers: real refused connections and real engine errors."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from actors.engine import ChatRequest, EngineError
from core.trajectory import FAILED
from tests.fixtures.rollout import small_rollout_config


def _dead_url() -> str:
    # A port that was just free: connecting to it is refused (a real failure, no fake server).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("on_failure, reruns", [("drop", 0), ("rerun", 1)])
def test_unreachable_env_fails_episodes_and_group_is_dropped(rollout_engine_config, tmp_path, on_failure, reruns):
    from actors.rollout_worker import RolloutWorker, group_failed
    from core.trajectory import read_trajectories

    cfg = small_rollout_config(on_failure=on_failure, max_group_reruns=reruns, connect_timeout_s=5.0)
    with RolloutWorker("dead", cfg, rollout_engine_config, None, tmp_path, env_urls=[_dead_url()]) as worker:
        group = worker.run_group("miniwob.click-test", 1, 3)
        st = worker.stats()
    assert group_failed(group) and len(group.trajectories) == 3
    assert all(t.status == FAILED and t.failure_reason.startswith("env_error") and not t.trainable
               for t in group.trajectories)
    attempts = 1 + reruns
    assert st["balanced"]
    assert (st["episodes_started"], st["episodes_failed"]) == (3 * attempts, 3 * attempts)
    assert (st["group_attempts"], st["groups_rerun"], st["groups_dropped"], st["groups_completed"]) == (
        attempts, reruns, 1, 0)
    assert st["failure_reasons"] == {"env_error": 3 * attempts}
    # Every attempt is on disk with its reasons (nothing lost, nothing scored).
    on_disk = [t for g in read_trajectories(tmp_path / "trajectories") for t in g.trajectories]
    assert len(on_disk) == 3 * attempts and all(t.status == FAILED and t.failure_reason for t in on_disk)
    # A failed episode has no return: null in the Parquet files, never a reward of 0.0 a reader could count.
    import pyarrow.parquet as pq

    assert all(t.episode_return is None for t in group.trajectories + on_disk)
    column = [v for f in (tmp_path / "trajectories").glob("*.parquet") for v in pq.read_table(f)["episode_return"].to_pylist()]
    assert column == [None] * (3 * attempts)


def test_batcher_isolates_a_bad_request(rollout_engine_config):
    from actors.engines import create_engine
    from actors.episode import GenerationBatcher
    from actors.engine import SamplingSettings

    engine = create_engine(rollout_engine_config)
    batcher = GenerationBatcher(engine, SamplingSettings(max_new_tokens=4), timeout_s=300)
    good = ChatRequest([{"role": "user", "content": "click the button"}])
    bad = ChatRequest([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                      images=[b"not an image"])
    results = {}

    def ask(name, request):
        try:
            results[name] = batcher.generate(request)
        except Exception as exc:  # noqa: BLE001
            results[name] = exc

    try:
        # The engine is busy (as during a weight update) while both ask: they share the next call.
        with batcher.engine_lock:
            threads = [threading.Thread(target=ask, args=a) for a in (("good", good), ("bad", bad))]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while batcher.waiting() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.waiting() == 2
        for t in threads:
            t.join(timeout=300)
    finally:
        batcher.close()
        engine.close()
    assert isinstance(results["bad"], EngineError)
    assert results["good"].completion_ids and results["good"].policy_version == 0
    assert batcher.stats.max_batch == 2  # they were batched together first
