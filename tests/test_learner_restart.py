"""The learner's process is SIGKILLed mid-run: the run rebuilds the learner from its last
checkpoint and finishes; past the learner restart budget it ends with the `--resume` line. A rollout
worker's process SIGKILLed mid-run is replaced, in the same run.

Real sync runs on the browser-free recorded env (real env servers, Ray workers and learner; no
Chromium). One run (4 steps, checkpoints every 2) has both kills, each in its own step:
- after step 1 the test kills worker w1's process. Step 2 sends w1 a group, which fails with
  ActorDiedError; the driver starts a new actor at w1's placement, loads the learner's current
  version into it and re-issues the group (same task, seed and index) to it.
- after step 3 it kills the learner's process; step 4's train call fails with ActorDiedError, the
  driver starts a new learner at the same placement, loads the step-2 checkpoint, undoes step 3 and
  drops the groups sampled by v3 (a policy the new learner never had), publishes the checkpoint's
  weights as v4 (above v3, the newest the engines saw) and trains steps 3 and 4 again.
(The worker kill used to have a 4-step run of its own; the two recoveries do not touch each
other's state, so one run shows both and the suite runs one run less.) The same
logic with fakes, async included, is in tests/test_scheduler.py.
"""

from __future__ import annotations

import functools
import json
import os
import signal

import pytest

from cluster import driver
from cluster.metrics import read_metrics

pytestmark = pytest.mark.slow  # no browser, but Ray, two workers, a worker and a learner killed and rebuilt


def _kill_actor(handle) -> int:
    import ray

    pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_worker_and_learner_are_rebuilt_and_the_run_finishes(ray_cluster, tmp_path):
    import ray

    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    cfg = recorded_config(run_dir, **{"cluster.total_steps": 4, "checkpoint.every_steps": 2,
                                      "cluster.run_name": "learner-restart"})
    assert cfg.cluster.learner_restart_budget == 1
    assert cfg.cluster.worker_restart_budget >= 1 and cfg.cluster.num_rollout_workers == 2
    seen: list[tuple[int, list[int]]] = []
    """(step, every engine's version) after each step: what the engines were sent, in order."""
    killed: dict[str, int] = {}

    def record_and_kill(trainer, step):
        seen.append((step, ray.get([w.get_policy_version.remote() for w in trainer.workers], timeout=60)))
        if step == 1 and "worker" not in killed:
            killed["worker"] = _kill_actor(trainer.workers[1])
        if step == 3 and "learner" not in killed:
            killed["learner"] = _kill_actor(trainer.fleet.learners[0])

    summary = driver.train(cfg, run_dir, on_step=record_and_kill)

    assert set(killed) == {"worker", "learner"}
    # the replacement of w1 followed every sync; steps 1-3, then (restored at step 2, sent as v4)
    # steps 3 and 4 again: versions only go up
    assert seen == [(1, [1, 1]), (2, [2, 2]), (3, [3, 3]), (3, [5, 5]), (4, [6, 6])], seen
    assert summary["steps"] == 4 and summary["learner_version"] == 6 and summary["worker_versions"] == [6, 6]
    assert summary["learner_restarts"] == 1 and summary["worker_restarts"] == 1
    assert [(s["step"], s["learner_version"]) for s in summary["trained_steps"]] == [(1, 0), (2, 1), (3, 4), (4, 5)]
    _check_books(summary, cfg)
    records = read_metrics(run_dir)
    [event] = [r for r in records if r.get("event") == "learner_restart"]
    assert event["restored_from"] == "checkpoint step-000002" and event["steps_undone"] == [3]
    assert (event["checkpoint_version"], event["highest_version_sent"], event["policy_version"]) == (2, 3, 4)
    assert "died" in event["error"]
    rows = [r for r in records if "policy_version" in r and "event" not in r]
    assert [r["learner_restarts"] for r in rows] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert [r["worker_restarts"] for r in rows] == [0.0, 1.0, 0.0, 0.0, 0.0]
    [event] = [r for r in records if r.get("event") == "worker_restart"]
    assert event["worker"] == "w1" and "died" in event["error"].lower()
    # the re-issued instance is the lost group's: trained at step 2, before the step-2 checkpoint
    reissued = [tuple(i) for i in event["reissued"]]
    assert reissued and set(reissued) <= set(tuple(i) for i in summary["trained_steps"][1]["instances"])
    written = json.loads((run_dir / "summary.json").read_text())
    assert (written["learner_restarts"], written["worker_restarts"]) == (1, 1)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000004"


def _check_books(summary, cfg) -> None:
    acc = summary["accounting"]
    assert acc["balanced"] and acc["started"] == acc["trained"] + sum(acc["dropped"].values()), acc
    # step 3's groups (update lost) and step 4's first batch (sampled by v3): 2 + 2 groups
    assert acc["groups_dropped"]["learner_recovered"] == 4 and acc["groups_trained"] == 4 * cfg.cluster.groups_per_step
    assert acc["dropped"].get("worker_died", 0) >= 1  # the dead worker's lost group's episodes, counted
    # nothing was lost as an actor failure: the dead worker's group was re-issued, not dropped
    assert "actor_failure" not in {d[3] for d in summary["dropped_instances"]}
    trained = [tuple(i) for s in summary["trained_steps"] for i in s["instances"]]
    assert len(trained) == len(set(trained)) == 4 * cfg.cluster.groups_per_step
    indices = [i[2] for i in trained] + [d[2] for d in summary["dropped_instances"]]
    assert sorted(indices) == list(range(len(indices)))  # every handed-out instance has exactly one fate


def test_a_learner_death_past_the_budget_prints_the_resume_line(ray_cluster, tmp_path, monkeypatch, capsys):
    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    overrides = {"cluster.total_steps": 2, "checkpoint.every_steps": 1, "cluster.learner_restart_budget": 0,
                 "cluster.run_name": "learner-budget"}
    cfg = recorded_config(run_dir, **overrides)

    def kill_after_step_1(trainer, step):
        if step == 1:
            _kill_actor(trainer.fleet.learners[0])

    # `bgrpo train` itself, with the kill hooked into its run (main has no hook of its own)
    monkeypatch.setattr(driver, "train", functools.partial(driver.train, on_step=kill_after_step_1))
    from cluster.config.command_line import CommandLine

    monkeypatch.setattr(driver, "parse_cli", lambda argv: CommandLine(config=cfg, preset="local"))
    assert driver.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("bgrpo train: learner rank 0 died (") and "budget is used up (0 of 0 restarts" in line
    assert line.endswith(f"the run folder is {run_dir}; continue from its last checkpoint with: "
                         f"bgrpo train --resume {run_dir}"), line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000001"


def test_the_version_counter_only_moves_up():
    from types import SimpleNamespace

    from learner.learner import Learner

    learner = SimpleNamespace(_policy_version=2)  # the method reads and writes the counter only
    assert Learner.advance_policy_version(learner, 4) == 4 and learner._policy_version == 4
    with pytest.raises(ValueError, match="never go back: 3 < 4"):
        Learner.advance_policy_version(learner, 3)
