"""Two rollout workers as real Ray actors (CPU) run different groups at the same time."""

from __future__ import annotations

import pytest

from core.trajectory import FINISHED, TRUNCATED
from tests.fixtures.rollout import small_rollout_config

pytestmark = pytest.mark.browser

TASK = "miniwob.click-test"


def test_two_worker_actors_run_groups_concurrently(ray_cluster, rollout_engine_config, rollout_env_config,
                                                   tmp_path):
    import ray

    from actors.rollout_worker import RolloutWorkerActor

    # One session (one browser) per worker: two browsers in all.
    cfg = small_rollout_config(num_sessions=1, max_steps=2)
    workers = [
        RolloutWorkerActor.options(num_cpus=1).remote(f"w{i}", cfg, rollout_engine_config, rollout_env_config,
                                                      str(tmp_path / f"w{i}"))
        for i in range(2)
    ]
    try:
        refs = [w.run_group.remote(TASK, seed, 2) for w, seed in zip(workers, (21, 22))]
        groups = ray.get(refs, timeout=900)
        stats = ray.get([w.stats.remote() for w in workers], timeout=60)

        for i, (g, seed) in enumerate(zip(groups, (21, 22))):
            assert (g.task, g.seed, len(g.trajectories)) == (TASK, seed, 2)
            assert all(t.status in (FINISHED, TRUNCATED) and t.worker_id == f"w{i}" for t in g.trajectories)
            assert (tmp_path / f"w{i}" / "trajectories" / f"group-{g.group_id}.parquet").is_file()
        assert groups[0].group_id != groups[1].group_id

        # The counters add up: every episode started is accounted for, per worker and in total.
        assert all(s["balanced"] for s in stats)
        assert sum(s["episodes_started"] for s in stats) == sum(len(g.trajectories) for g in groups) == 4
        assert sum(s["episodes_finished"] + s["episodes_truncated"] for s in stats) == 4
        assert sum(s["steps"] for s in stats) == sum(len(t.steps) for g in groups for t in g.trajectories)
        assert [s["groups_completed"] for s in stats] == [1, 1]
        # Both ran at the same time: each one's group started before the other's ended.
        (s0, e0), (s1, e1) = (s["last_group_window"] for s in stats)
        assert s0 < e1 and s1 < e0
        assert all(s["policy_version"] == 0 for s in stats)
    finally:
        ray.get([w.close.remote() for w in workers], timeout=120)
        for w in workers:
            ray.kill(w)
