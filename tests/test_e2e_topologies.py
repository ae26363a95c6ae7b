"""Other placements of the same run: env servers as CPU-only Ray actors (the cluster layout)."""

from __future__ import annotations

import pytest

from cluster import driver
from tests.test_e2e import local_config

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_env_servers_as_ray_actors(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    cfg = local_config(run_dir, **{
        "cluster.total_steps": 1, "cluster.env_placement": "ray_actors", "cluster.env_servers_per_worker": 1,
        "cluster.env_server_num_cpus": 0.5, "checkpoint.every_steps": 0,
    })
    seen: dict = {}

    def inspect(trainer, step):
        import ray

        seen["hosts"] = len(trainer.env_hosts)
        seen["urls"] = [u for h in trainer.env_hosts for u in ray.get(h.urls.remote())]
        seen["worker_urls"] = [u for w in trainer.workers for u in ray.get(w.env_urls.remote())]
        seen["worker_pids"] = [p for w in trainer.workers for p in ray.get(w.env_server_pids.remote())]

    summary = driver.train(cfg, run_dir, on_step=inspect)
    assert seen["hosts"] == 2
    assert sorted(seen["worker_urls"]) == sorted(seen["urls"])  # workers use the hosts' servers
    assert all(u.startswith("http://127.0.0.1:") for u in seen["urls"])  # one node: loopback only
    assert seen["worker_pids"] == [None, None]  # no embedded servers in the workers
    assert summary["accounting"]["balanced"] and summary["worker_versions"] == [summary["learner_version"]] * 2
