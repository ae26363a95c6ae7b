"""A rollout worker with real Chromium (embedded env-server pool), the tiny VLM on the
transformers engine: groups, exact recording, Parquet, viewer, weight versions, env failures."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from actors.trajectory import FAILED, FINISHED, TRUNCATED, read_trajectories
from tests.fixtures.rollout import small_rollout_config

pytestmark = pytest.mark.browser

TASK = "miniwob.click-test"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rollout-run")


@pytest.fixture(scope="module")
def worker(rollout_engine_config, rollout_env_config, run_dir):
    from actors.rollout_worker import RolloutWorker

    w = RolloutWorker("w0", small_rollout_config(), rollout_engine_config, rollout_env_config, run_dir)
    try:
        yield w
    finally:
        pids = [p for p in w.env_server_pids() if p]
        w.close()
        for pid in pids:  # the worker stopped every server it started
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.fixture(scope="module")
def tokenizer(tiny_vl_model):
    from actors.engines.processing import load_processor, tokenizer_of

    return tokenizer_of(load_processor(tiny_vl_model))


def _group_from_disk(run_dir, group_id):
    groups = {g.group_id: g for g in read_trajectories(run_dir / "trajectories")}
    return groups[group_id]


def test_group_of_four_episodes_is_recorded_exactly(worker, run_dir, tokenizer):
    before = worker.stats()
    group = worker.run_group(TASK, 11, 4)

    # --- one GRPO group: four episodes of the same task instance ---
    assert len(group.trajectories) == 4
    assert {(t.task, t.seed, t.group_id) for t in group.trajectories} == {(TASK, 11, group.group_id)}
    goals = {t.goal for t in group.trajectories}
    assert len(goals) == 1 and goals.pop().strip()
    assert all(t.status in (FINISHED, TRUNCATED) for t in group.trajectories)
    assert len({t.episode_id for t in group.trajectories}) == 4

    # --- every step exactly as sampled ---
    for t in group.trajectories:
        assert 1 <= len(t.steps) <= 3
        for s in t.steps:
            assert tokenizer.decode(s.completion_ids, skip_special_tokens=True) == s.completion_text
            assert len(s.logprobs) == len(s.completion_ids) > 0
            assert all(lp <= 0.0 for lp in s.logprobs)
            assert s.policy_version == 0
            assert len(s.images) == 1 and s.images[0].startswith(b"\x89PNG")
            assert s.action  # a parsed action or the recorded fallback
            assert not s.parse_fallback or s.action == "noop(0)"
            assert s.engine_s > 0 and s.env_s > 0

    # --- Parquet round trip and the viewer ---
    assert _group_from_disk(run_dir, group.group_id) == group
    page = (run_dir / "viewer" / f"group-{group.group_id}.html").read_text()
    assert group.trajectories[0].goal in page and page.count("data:image/png;base64,") == sum(
        len(t.steps) for t in group.trajectories)

    # --- counters balance; the engine batched the sessions' prompts ---
    st = worker.stats()
    assert st["balanced"]
    assert st["episodes_started"] - before["episodes_started"] == 4
    new_steps = st["steps"] - before["steps"]
    assert new_steps == sum(len(t.steps) for t in group.trajectories)
    assert st["engine_requests"] - before["engine_requests"] == new_steps
    assert st["engine_calls"] - before["engine_calls"] < new_steps  # some calls served 2 episodes
    assert st["engine_max_batch"] == 2


def test_update_weights_passes_through_and_versions_are_recorded(worker, tiny_vl_model):
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(next(tiny_vl_model.glob("*.safetensors"))))
    name = next(n for n in weights if "embed_tokens" in n)
    new = {name: weights[name] + 0.01 * torch.randn_like(weights[name])}
    assert worker.update_weights(1, new) == 1
    assert worker.get_policy_version() == 1 and worker.stats()["policy_version"] == 1

    group = worker.run_group(TASK, 12, 2)
    assert {s.policy_version for t in group.trajectories for s in t.steps} == {1}
    assert group.min_policy_version == 1


def test_killed_env_server_fails_its_episode_and_is_replaced(worker, run_dir):
    before = worker.stats()
    pids = worker.env_server_pids()
    victim = pids[0]
    result = {}

    def run():
        result["group"] = worker.run_group(TASK, 13, 4)

    thread = threading.Thread(target=run)
    thread.start()
    # Kill server 0 (a real SIGKILL) once the group is mid-episode.
    deadline = time.monotonic() + 300
    while worker.stats()["steps"] == before["steps"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.stats()["steps"] > before["steps"], "the group never took a step"
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive()

    # The failed attempt: on disk with its reason, never scored as a real outcome.
    st = worker.stats()
    assert st["balanced"]
    assert st["episodes_failed"] - before["episodes_failed"] >= 1
    assert st["env_restarts"] - before["env_restarts"] >= 1
    assert st["groups_rerun"] - before["groups_rerun"] == 1
    assert set(st["failure_reasons"]) <= {"env_error", "env_timeout"}
    failed = [t for g in read_trajectories(run_dir / "trajectories") for t in g.trajectories
              if t.status == FAILED and t.seed == 13]
    assert failed and all(t.failure_reason.startswith(("env_error", "env_timeout")) for t in failed)
    assert all(not t.trainable for t in failed)

    # A fresh server replaced the dead one ...
    new_pids = worker.env_server_pids()
    assert new_pids[0] != victim and new_pids[1] == pids[1]
    os.kill(new_pids[0], 0)  # alive
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)

    # ... the re-run of the group succeeded, and so does the next group.
    group = result["group"]
    assert all(t.status in (FINISHED, TRUNCATED) for t in group.trajectories) and len(group.trajectories) == 4
    nxt = worker.run_group(TASK, 14, 2)
    assert all(t.status in (FINISHED, TRUNCATED) for t in nxt.trajectories)
    st = worker.stats()
    assert st["balanced"] and st["groups_completed"] - before["groups_completed"] == 2
