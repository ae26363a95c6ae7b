"""A rollout worker's process is SIGKILLed mid-run: the run replaces it and finishes.

A real sync run on the browser-free recorded env (real env servers, Ray workers and learner; no
Chromium): after step 2 the test kills worker w1's process. Step 3 sends w1 a group, which fails
with ActorDiedError; the driver starts a new actor at w1's placement, loads the learner's current
version into it and re-issues the group (same task and seed) to it. The unit tests of the same
logic with fakes are in tests/test_scheduler.py."""

from __future__ import annotations

import json
import os
import signal

import pytest

from cluster import driver
from cluster.metrics import read_metrics

pytestmark = pytest.mark.slow  # no browser, but Ray, two workers, a learner and a restart


def test_a_killed_worker_is_restarted_and_the_run_finishes(ray_cluster, tmp_path):
    import ray

    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    cfg = recorded_config(run_dir, **{"cluster.total_steps": 4, "checkpoint.every_steps": 0,
                                      "cluster.run_name": "worker-restart"})
    assert cfg.cluster.worker_restart_budget >= 1 and cfg.cluster.num_rollout_workers == 2
    killed: dict[str, object] = {}

    def kill_w1(trainer, step):
        if step != 2:
            return
        worker = trainer.workers[1]
        pid = ray.get(worker.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        killed.update(pid=pid, handle=worker)

    summary = driver.train(cfg, run_dir, on_step=kill_w1)

    assert killed["pid"]
    assert summary["steps"] == 4 and summary["learner_version"] == 4
    assert summary["worker_restarts"] == 1
    assert summary["worker_versions"] == [4, 4]  # the replacement followed every later sync
    acc = summary["accounting"]
    assert acc["balanced"], acc
    assert acc["started"] == acc["trained"] + sum(acc["dropped"].values())
    assert acc["dropped"].get("worker_died", 0) >= 1  # its lost group's episodes, counted
    # nothing was lost as an actor failure: the dead worker's group was re-issued, not dropped
    assert "actor_failure" not in {d[3] for d in summary["dropped_instances"]}
    records = read_metrics(run_dir)
    rows = {r["step"]: r for r in records if "policy_version" in r and "event" not in r}
    assert sorted(rows) == [1, 2, 3, 4]
    assert [rows[s]["worker_restarts"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 0.0]
    [event] = [r for r in records if r.get("event") == "worker_restart"]
    assert event["worker"] == "w1" and "died" in event["error"].lower()
    # the re-issued instance is the lost group's: trained at step 3 or 4 (sync trains every group)
    reissued = [tuple(i) for i in event["reissued"]]
    trained = [tuple(i) for s in summary["trained_steps"] for i in s["instances"]]
    assert reissued and set(reissued) <= set(trained)
    assert len(trained) == len(set(trained)) == 4 * cfg.cluster.groups_per_step
    assert json.loads((run_dir / "summary.json").read_text())["worker_restarts"] == 1
