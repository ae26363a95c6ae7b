"""A rollout worker with real Chromium (embedded env-server pool), the tiny VLM on the
transformers engine: groups, exact recording, Parquet, viewer, weight versions, env failures."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from core.trajectory import FAILED, FINISHED, TRUNCATED, read_trajectories
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
    # The engine is busy (as during a weight update) while both sessions reset and ask: the
    # batcher then sends both waiting prompts as one call (batch size reaches K when all are ready).
    result = {}
    thread = threading.Thread(target=lambda: result.update(group=worker.run_group(TASK, 11, 4)))
    with worker._engine_lock:
        thread.start()
        deadline = time.monotonic() + 300
        while worker._batcher.waiting() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker._batcher.waiting() == 2
    thread.join(timeout=900)
    assert not thread.is_alive()
    group = result["group"]

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

    # --- counters balance; every step was one engine request; the two ready prompts shared a call ---
    st = worker.stats()
    assert st["balanced"]
    assert st["episodes_started"] - before["episodes_started"] == 4
    new_steps = st["steps"] - before["steps"]
    assert new_steps == sum(len(t.steps) for t in group.trajectories)
    assert st["engine_requests"] - before["engine_requests"] == new_steps
    assert st["engine_calls"] - before["engine_calls"] < new_steps  # the first call served 2 episodes
    assert st["engine_max_batch"] == 2  # never more than K = 2


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


def test_receive_weights_takes_the_strategy_the_update_names(worker, tiny_vl_model, ray_cluster):
    """The driver's one entry point: an object-store update is fetched and loaded with its
    version; an NCCL update is refused by the transformers engine (no worker processes to
    broadcast into), and the weights and version stay."""
    import torch
    from safetensors.torch import load_file

    from weightsync import WeightSyncError
    from weightsync.nccl import NcclUpdate
    from weightsync.object_store import ObjectStoreSender

    weights = load_file(str(next(tiny_vl_model.glob("*.safetensors"))))
    name = next(n for n in weights if "embed_tokens" in n)
    new = weights[name] + 0.01 * torch.randn_like(weights[name])
    update = ObjectStoreSender().publish(2, {name: new})
    assert worker.receive_weights(update) == 2 == worker.get_policy_version()
    assert torch.equal(worker.engine.model.state_dict()[name].float(), new.float())
    with pytest.raises(WeightSyncError, match="no worker processes"):
        worker.receive_weights(NcclUpdate(version=3))
    assert worker.get_policy_version() == 2


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


class _SlowSession:
    """A wrapper around the worker's real env session (real Chromium behind it) whose first step
    blocks until the test releases it: a deliberately slow browser. Everything else passes through."""

    def __init__(self, inner, release: threading.Event, batcher):
        self.inner = inner
        self.release = release
        self.batcher = batcher
        self.blocked = threading.Event()  # set while the first step is held
        self.released_by_test = None
        self.requests_at_release = None
        self.steps = 0

    def reset(self, task, seed):
        return self.inner.reset(task=task, seed=seed)

    def step(self, action):
        self.steps += 1
        if self.steps == 1:
            self.blocked.set()
            self.released_by_test = self.release.wait(timeout=300)
            self.requests_at_release = self.batcher.stats.requests
        return self.inner.step(action)

    def __getattr__(self, name):  # close() and the rest
        return getattr(self.inner, name)


def test_slow_session_holds_back_neither_the_fast_one_nor_the_next_group(worker):
    """No lockstep: while one session is stuck in a step, the other session's episode runs all
    its steps through the engine, and the next group (a concurrent run_group, as the threaded
    actor allows) resets on the freed session and finishes, before the slow step returns."""
    from actors.rollout_worker import ClientEnvSession

    cfg = worker.config
    slot = worker._slots[0]
    if slot.session is None:
        slot.session = ClientEnvSession(slot.url, cfg.connect_timeout_s, cfg.step_timeout_s)
    release = threading.Event()
    slow = _SlowSession(slot.session, release, worker._batcher)
    slot.session = slow
    before = worker.stats()
    results = {}
    try:
        first = threading.Thread(target=lambda: results.update(first=worker.run_group(TASK, 21, 2)))
        first.start()
        assert slow.blocked.wait(timeout=300), "the slow session never stepped"
        # The next group, dispatched while the first one is still running (one episode stuck).
        second = worker.run_group(TASK, 22, 1)
        assert not release.is_set() and slow.steps == 1  # the slow step is still held
    finally:
        release.set()
        first.join(timeout=900)
        if slot.session is slow:
            slot.session = slow.inner
    assert not first.is_alive() and slow.released_by_test
    group = results["first"]
    assert all(t.status in (FINISHED, TRUNCATED) for t in group.trajectories + second.trajectories)

    # Before the slow step was released, the engine had served the slow episode's first prompt
    # and every step of the fast episode and of the second group's episode (which could only run
    # on the other session, freed by the fast episode): counted exactly.
    fast_steps = sum(len(t.steps) for t in group.trajectories) - slow.steps
    second_steps = len(second.trajectories[0].steps)
    assert fast_steps >= 1 and second_steps >= 1
    assert slow.requests_at_release - before["engine_requests"] == 1 + fast_steps + second_steps
    st = worker.stats()
    assert st["balanced"] and st["groups_completed"] - before["groups_completed"] == 2
