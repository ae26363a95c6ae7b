"""The learner's process is SIGKILLed mid-run: the run rebuilds the learner from its last
checkpoint and finishes; past the learner restart budget it ends with the `--resume` line.

Real sync runs on the browser-free recorded env (real env servers, Ray workers and learner; no
Chromium). After step 3 (checkpoints every 2 steps) the test kills the learner's process; step 4's
train call fails with ActorDiedError, the driver starts a new learner at the same placement, loads
the step-2 checkpoint, undoes step 3 and drops the groups sampled by v3 (a policy the new learner
never had), publishes the checkpoint's weights as v4 (above v3, the newest the engines saw) and
trains steps 3 and 4 again. The same logic with fakes, async included, is in tests/test_scheduler.py.
"""

from __future__ import annotations

import functools
import json
import os
import signal

import pytest

from cluster import driver
from cluster.metrics import read_metrics

pytestmark = pytest.mark.slow  # no browser, but Ray, two workers, a learner killed and rebuilt


def _kill_learner(trainer) -> int:
    import ray

    pid = ray.get(trainer.fleet.learners[0].__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_learner_is_rebuilt_from_its_checkpoint_and_the_run_finishes(ray_cluster, tmp_path):
    import ray

    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    cfg = recorded_config(run_dir, **{"cluster.total_steps": 4, "checkpoint.every_steps": 2,
                                      "cluster.run_name": "learner-restart"})
    assert cfg.cluster.learner_restart_budget == 1
    seen: list[tuple[int, list[int]]] = []
    """(step, every engine's version) after each step: what the engines were sent, in order."""
    killed: list[int] = []

    def record_and_kill(trainer, step):
        seen.append((step, ray.get([w.get_policy_version.remote() for w in trainer.workers], timeout=60)))
        if step == 3 and not killed:
            killed.append(_kill_learner(trainer))

    summary = driver.train(cfg, run_dir, on_step=record_and_kill)

    assert killed
    # steps 1-3, then (restored at step 2, sent as v4) steps 3 and 4 again: versions only go up
    assert seen == [(1, [1, 1]), (2, [2, 2]), (3, [3, 3]), (3, [5, 5]), (4, [6, 6])], seen
    assert summary["steps"] == 4 and summary["learner_version"] == 6 and summary["worker_versions"] == [6, 6]
    assert summary["learner_restarts"] == 1 and summary["worker_restarts"] == 0
    assert [(s["step"], s["learner_version"]) for s in summary["trained_steps"]] == [(1, 0), (2, 1), (3, 4), (4, 5)]
    acc = summary["accounting"]
    assert acc["balanced"] and acc["started"] == acc["trained"] + sum(acc["dropped"].values()), acc
    # step 3's groups (update lost) and step 4's first batch (sampled by v3): 2 + 2 groups
    assert acc["groups_dropped"]["learner_recovered"] == 4 and acc["groups_trained"] == 4 * cfg.cluster.groups_per_step
    indices = [i[2] for s in summary["trained_steps"] for i in s["instances"]] + [d[2] for d in summary["dropped_instances"]]
    assert sorted(indices) == list(range(len(indices)))  # every handed-out instance has exactly one fate
    [event] = [r for r in read_metrics(run_dir) if r.get("event") == "learner_restart"]
    assert event["restored_from"] == "checkpoint step-000002" and event["steps_undone"] == [3]
    assert (event["checkpoint_version"], event["highest_version_sent"], event["policy_version"]) == (2, 3, 4)
    assert "died" in event["error"]
    rows = [r for r in read_metrics(run_dir) if "policy_version" in r and "event" not in r]
    assert [r["learner_restarts"] for r in rows] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert json.loads((run_dir / "summary.json").read_text())["learner_restarts"] == 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000004"


def test_a_learner_death_past_the_budget_prints_the_resume_line(ray_cluster, tmp_path, monkeypatch, capsys):
    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    overrides = {"cluster.total_steps": 2, "checkpoint.every_steps": 1, "cluster.learner_restart_budget": 0,
                 "cluster.run_name": "learner-budget"}
    cfg = recorded_config(run_dir, **overrides)

    def kill_after_step_1(trainer, step):
        if step == 1:
            _kill_learner(trainer)

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
