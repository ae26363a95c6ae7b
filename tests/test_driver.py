"""The driver's command line and bookkeeping, without starting actors."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from cluster import driver
from cluster.config import ClusterConfig


def test_bad_config_fails_before_ray_starts(capsys, monkeypatch):
    import ray

    # Independent of test order (a session Ray may already run): any attempt to start or join
    # Ray during these calls fails the test.
    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called for a bad config")

    monkeypatch.setattr(ray, "init", no_ray)
    was_initialized = ray.is_initialized()
    assert driver.main(["--config", "local", "--cluster.mode", "fast"]) == 2
    assert driver.main(["--config", "local", "--sampler.tasks", "[click-tset]"]) == 2
    assert driver.main(["--config", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "cluster.mode: 'fast' is not one of" in err
    assert "did you mean miniwob.click-test" in err
    assert "unknown preset 'no-such-preset'" in err
    assert ray.is_initialized() == was_initialized  # nothing was started


def test_help_lists_fields(capsys):
    assert driver.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--cluster.max_staleness" in out and "--learner.lr" in out and "MODEL_ID" in out


def test_bgrpo_command_reports_bad_config_fast():
    # Through the real console entry point, in a fresh process: exit code 2 and a clear message.
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "--cluster.total_steps", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cluster.total_steps must be >= 1" in proc.stderr


def _group(n, status="finished"):
    from core.group_meta import EpisodeMeta, GroupMeta

    return GroupMeta("g", "miniwob.click-test", 1, (EpisodeMeta(status, False, 0.0, True, (0,)),) * n)


def test_accounting_balances_only_when_every_episode_has_a_fate():
    acc = driver.Accounting()
    acc.returned = 12
    acc.trained = 6
    acc.drop("stale", _group(4), 0)
    acc.dropped["learner_filtered"] += 0
    acc.finalize(worker_started=14)  # 2 episodes of a re-run attempt
    assert acc.dropped["rerun_attempt"] == 2
    assert not acc.balanced  # 2 returned episodes are unaccounted for
    acc.drop("run_ended", _group(2), 1)
    assert acc.balanced
    assert acc.as_dict()["groups_dropped"] == {"stale": 1, "run_ended": 1}
    assert Counter(acc.as_dict()["dropped"]) == Counter({"stale": 4, "rerun_attempt": 2, "run_ended": 2})


def test_placement_rejects_impossible_requests(ray_cluster):
    from cluster.placement import PlacementError, check_resources

    with pytest.raises(PlacementError, match="needs 3 GPUs"):
        check_resources(ClusterConfig(num_rollout_workers=2, rollout_num_gpus=1, learner_num_gpus=1))
    with pytest.raises(PlacementError, match="CPUs"):
        check_resources(ClusterConfig(num_rollout_workers=100, rollout_num_cpus=1))
    check_resources(ClusterConfig())  # the local preset's request fits the test cluster
    with pytest.raises(PlacementError, match="evaluation worker 1"):
        check_resources(ClusterConfig(num_rollout_workers=1, rollout_num_gpus=0), eval_gpus=1)


def test_colocated_placement_shares_one_bundle_per_pair(ray_cluster):
    """cluster.colocate: one placement group; learner rank i and rollout worker i are scheduled
    into the same bundle (so on a GPU cluster they share its GPU)."""
    from cluster.placement import Placement

    cfg = ClusterConfig(num_rollout_workers=2, learner_num_ranks=2, colocate=True,
                        learner_num_cpus=0.5, rollout_num_cpus=0.5)
    placement = Placement.create(cfg, timeout_s=60)
    try:
        assert placement.learner_pg is placement.rollout_pg
        assert placement.learner_pg.bundle_specs == [{"CPU": 1.0}, {"CPU": 1.0}]
        for i in range(2):
            lo, ro = placement.learner_options(i)["scheduling_strategy"], placement.rollout_options(i)["scheduling_strategy"]
            assert lo.placement_group is ro.placement_group
            assert lo.placement_group_bundle_index == ro.placement_group_bundle_index == i
    finally:
        placement.remove()


def test_a_dead_actor_ends_the_run_with_one_line_and_the_resume_command(capsys, monkeypatch, tmp_path):
    # Killing the learner for real needs a whole run; the line's wording is checked here with the
    # exception Ray raises when an actor's process is gone (ActorDiedError), from a patched train().
    import ray.exceptions

    def dies(config, *args, **kwargs):
        config.cluster.run_dir = str(tmp_path / "run")  # train() records its run folder first
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(driver, "train", dies)
    assert driver.main(["--config", "local"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "an actor died" in err[0] and "The actor died unexpectedly" in err[0]
    assert err[0].endswith(f"bgrpo train --resume {tmp_path / 'run'}")

    def bug(config, *args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(driver, "train", bug)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        driver.main(["--config", "local"])
