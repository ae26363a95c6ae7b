"""Env servers that die mid-run are replaced in every placement, and the episodes they broke are
counted failed, re-run and never trained.

Real training runs (driver, Ray rollout workers, learner) on the browser-free recorded env, whose
servers are the same real server processes as BrowserGym's (no Chromium: cheap on 2 cores). After
learner step 1 the test SIGKILLs real processes; the next collection's episodes on them fail (their
WebSocket is gone), the worker replaces the server and the group is re-run:
- ray_actors: a server process inside the env-server host actor -> restarted by the host; then
  (after step 2) the host actor's own process -> Ray restarts the actor, with new servers, and the
  worker takes their URLs;
- remote: one of two servers the test started itself -> the worker's session fails over to the
  other one.
- embedded (a worker's own server process, restarted by the worker's pool) has no run of its own
  here: tests/test_rollout_worker.py kills a worker's embedded server mid-group (real Chromium) and
  checks the failed episodes, the new server and the group's successful re-run; tests/test_chaos.py
  kills an embedded env server in a real run (the local preset's placement) and checks that the run
  booked the restart in a step's metrics record, finished with balanced books and scored no
  failed episode.
Plus the bound: a worker whose servers keep dying ends the run with a clear error, and a run
whose every group fails stops instead of dropping groups forever.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from cluster import driver
from cluster.metrics import read_metrics
from core.trajectory import FAILED, read_trajectories

pytestmark = pytest.mark.slow  # three short training runs (Ray, workers, learner; no browser)

TASK = "recorded.click-button"


def _config(run_dir, steps=2, **overrides):
    from tests.test_recorded_env import recorded_config

    # One worker, one session, groups of 2: the least that shows a kill, a failed episode and a re-run.
    return recorded_config(run_dir, **{"cluster.total_steps": steps, "checkpoint.every_steps": 0, "logging.plots": "false",
                                       "cluster.num_rollout_workers": 1, "cluster.groups_per_step": 1,
                                       "grpo.num_generations": 2, **overrides})


def _check_failed_then_rerun(summary: dict, run_dir, steps: int = 2) -> None:
    """The run finished; every episode broken by a kill is FAILED with an env reason, has no
    reward, is not trainable and its group was never trained; its group was re-run (same task and
    seed) and that re-run trained; the books balance."""
    assert summary["steps"] == steps and summary["worker_versions"] == [steps]
    acc = summary["accounting"]
    assert acc["balanced"], acc
    groups = read_trajectories(run_dir / "trajectories")
    failed_groups = [g for g in groups if any(t.status == FAILED for t in g.trajectories)]
    assert failed_groups, "no episode failed: the kill hit nothing"
    trained_ids = {gid for s in summary["trained_steps"] for gid in s["group_ids"]}
    for g in failed_groups:
        assert g.group_id not in trained_ids
        for t in g.trajectories:
            if t.status == FAILED:
                assert t.failure_reason.startswith(("env_error", "env_timeout")), t.failure_reason
                assert t.episode_return is None and not t.success and not t.trainable
                assert all(s.reward == 0.0 for s in t.steps)
        reruns = [r for r in groups if (r.task, r.seed) == (g.task, g.seed)
                  and all(t.status != FAILED for t in r.trajectories)]
        assert any(r.group_id in trained_ids for r in reruns), f"group {g.task}/{g.seed} was not re-run and trained"
    assert sum(w["groups_rerun"] for w in summary["worker_stats"]) >= 1
    assert summary["env_failures"] >= sum(t.status == FAILED for g in groups for t in g.trajectories)
    assert "actor_failure" not in {d[3] for d in summary["dropped_instances"]}


def _worker_pid(worker) -> int:
    import ray

    return ray.get(worker.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _wait_gone(pids: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    from core.processes import start_time  # None once a process is gone (or a zombie)

    while any(start_time(p) is not None for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} still alive {timeout_s:g} s after their parent died"
        time.sleep(0.1)


def test_ray_actor_server_and_host_killed_are_replaced(ray_cluster, tmp_path):
    import ray

    run_dir = tmp_path / "run"
    seen = {}

    def kill(trainer, step):
        host = trainer.env_hosts[0]
        seen[step] = ray.get(trainer.workers[0].env_urls.remote(), timeout=60)
        if step == 1:
            [server] = ray.get(host.pids.remote(), timeout=60)
            os.kill(server, signal.SIGKILL)  # a server process inside the host
        if step == 2:
            servers = ray.get(host.pids.remote(), timeout=60)
            seen["host_pid"] = _worker_pid(host)
            os.kill(seen["host_pid"], signal.SIGKILL)  # the host actor's process itself
            # Its orphaned servers exit on their own (their parent watch polls every 0.5 s); wait
            # for that, or step 3's short recorded episodes may still finish on them (a race that
            # once left the host's death unnoticed in CI).
            _wait_gone(servers)

    cfg = _config(run_dir, steps=3, **{"cluster.run_name": "env-ray-actors", "cluster.env_placement": "ray_actors"})
    summary = driver.train(cfg, run_dir, on_step=kill)
    _check_failed_then_rerun(summary, run_dir, steps=3)
    # the host restarted its server (new URL), then Ray restarted the host (new process, new servers)
    assert summary["env_restarts"] >= 2 and summary["worker_restarts"] == 0
    assert seen[1] != seen[2] != seen[3]
    rows = [r for r in read_metrics(run_dir) if "env_restarts" in r and "event" not in r]
    assert [r["env_restarts"] >= 1 for r in rows] == [False, True, True]
    with pytest.raises(ProcessLookupError):
        os.kill(seen["host_pid"], 0)


def test_remote_server_killed_fails_over_to_the_other(ray_cluster, tmp_path):
    from envs.browsergym.config import EnvConfig
    from envs.browsergym.pool import EnvServerPool

    run_dir = tmp_path / "run"
    with EnvServerPool(2, EnvConfig(task=TASK, max_sessions=2)) as pool:
        a, b = pool.urls
        victim = pool.pids[0]

        urls = {}

        def kill_a(trainer, step):
            import ray

            if step == 1:
                os.kill(victim, signal.SIGKILL)
            if step == 2:
                urls["after"] = ray.get([w.env_urls.remote() for w in trainer.workers], timeout=60)

        cfg = _config(run_dir, **{"cluster.run_name": "env-remote", "cluster.env_placement": "remote",
                                  "cluster.env_server_urls": f"[{a}, {b}]"})
        summary = driver.train(cfg, run_dir, on_step=kill_a)
    _check_failed_then_rerun(summary, run_dir)
    # the worker's session (on a, the first of its two servers) moved to b
    assert summary["env_failovers"] >= 1 and summary["env_restarts"] == 0
    assert urls["after"] == [[b]]


def test_a_server_that_keeps_dying_ends_the_run_with_a_clear_error(ray_cluster, rollout_engine_config, tmp_path):
    """rollout.env_restart_budget 0: the first restart is one too many. The worker's group raises
    EnvServersGaveUp (a real server killed under an in-process worker), and the driver's collect
    turns that error, raised in a Ray task, into the run's TrainingError (no retries)."""
    import ray

    from actors.env_servers import EnvServersGaveUp
    from actors.rollout_worker import RolloutWorker
    from cluster.accounting import TrainingError
    from cluster.fleet import RayRollouts
    from envs.browsergym.config import EnvConfig
    from tests.fixtures.rollout import small_rollout_config

    cfg = small_rollout_config(num_sessions=1, env_restart_budget=0)
    with RolloutWorker("w0", cfg, rollout_engine_config, EnvConfig(task=TASK), tmp_path) as worker:
        [pid] = worker.env_server_pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EnvServersGaveUp, match=r"env servers failed 1 times .*env_restart_budget 0") as caught:
            worker.run_group(TASK, 3, 2)
        st = worker.stats()
        assert st["env_restarts"] == 1 and st["balanced"] and st["groups_dropped"] == 1
        with pytest.raises(EnvServersGaveUp):  # and every later group, at once
            worker.run_group(TASK, 4, 2)

    message = str(caught.value)

    @ray.remote(num_cpus=0)
    def gave_up():
        from actors.env_servers import EnvServersGaveUp

        raise EnvServersGaveUp(message)  # what the worker's run_group raised, now in a Ray task

    rollouts = RayRollouts(SimpleNamespace(workers=[None]), None, group_timeout_s=120)
    ref = gave_up.remote()
    rollouts._group_refs[ref], rollouts._worker_of[ref] = ref, 0  # as dispatch() records a group
    with pytest.raises(TrainingError, match="env_restart_budget 0"):
        rollouts.collect(ref)


def test_groups_failing_in_a_row_stop_the_run():
    """Every group failing (e.g. every remote server down) ends the run at
    cluster.max_failed_groups_in_a_row instead of dropping groups forever; a good group resets it."""
    from cluster.accounting import Ledger, TrainingError
    from cluster.config import SamplerConfig
    from cluster.sampler import TaskSampler
    from core.group_meta import GroupMeta
    from core.trajectory import FINISHED, Trajectory, TrajectoryGroup

    def meta(status):
        t = Trajectory("e", "g", TASK, 1, status=status, failure_reason="env_error: down" if status == FAILED else "")
        return GroupMeta.of(TrajectoryGroup("g", TASK, 1, [t]))

    sampler = TaskSampler(SamplerConfig(tasks=[TASK]))
    ledger = Ledger(sampler, max_actor_failures=0, max_failed_in_a_row=3)
    for status in (FAILED, FAILED, FINISHED, FAILED, FAILED):
        ledger.receive(meta(status), None, sampler.next())
    with pytest.raises(TrainingError, match=r"3 groups in a row failed .*env_error: down"):
        ledger.receive(meta(FAILED), None, sampler.next())


def test_env_hosts_ask_for_their_custom_resources_and_restarts(ray_cluster):
    """cluster.env_host_resources pins the hosts to nodes that have them (a cluster without them
    is refused before anything waits), and Ray restarts a host that died."""
    from cluster.config import ClusterConfig
    from cluster.placement import Placement, PlacementError, check_resources

    cfg = ClusterConfig(env_placement="ray_actors", num_rollout_workers=1, env_host_resources={"browsers": 1})
    with pytest.raises(PlacementError, match="resource 'browsers'"):
        check_resources(cfg)
    options = Placement(cfg, None, None).env_host_options()
    assert options["resources"] == {"browsers": 1.0} and options["max_restarts"] == -1
    assert "resources" not in Placement(ClusterConfig(), None, None).env_host_options()
