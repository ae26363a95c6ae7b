"""The whole system on CPU: real Ray actors, real Chromium + MiniWoB, the tiny offline Qwen3-VL,
transformers engines, 2 rollout workers, the learner, >= 3 learner steps.

Runs go through `cluster.driver.train` inside the test process, on the session's Ray cluster (the
driver joins a running Ray instead of starting one). Each run is started once per module and its
run folder and summary are inspected by several tests.

The sync run places its env servers as CPU-only Ray actors (the cluster layout); the async run
keeps the local preset's embedded servers (subprocesses of each worker). The ray-actor layout had
a separate 1-step run of its own (52 s of a loaded 2-core machine); it is checked on the sync run.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import requests

from core.trajectory import read_trajectories
from cluster import config as C
from cluster import driver
from cluster.metrics import read_metrics

pytestmark = pytest.mark.browser


# The e2e model is the tiny VLM; BGRPO_E2E_MODEL=tiny-lm runs the same tests with the tiny text
# model (accessibility-tree prompts) to tell a vision-path problem from a driver problem.
E2E_MODEL = os.environ.get("BGRPO_E2E_MODEL", "tiny-vlm")


# The `local` preset is the learning run (warm start, GRPO on click-test-2, before/after evaluation);
# these tests check the system's wiring on the old smoke settings: no warm start, click-test,
# 3-step episodes, 3 learner steps, checkpoints every 2 steps.
SMOKE = {"warm_start.enabled": "false", "eval.before_training": "false", "sampler.tasks": "[click-test]",
         "rollout.max_steps": "3", "cluster.total_steps": "3", "learner.lr": "1e-4", "learner.micro_batch_size": "4",
         "checkpoint.every_steps": "2", "eval.episodes_per_task": "2", "eval.greedy": "true", "eval.num_sessions": "1",
         "rollout.prompt.include_screenshot": "true", "rollout.prompt.include_axtree": "false",
         "rollout.prompt.max_clickable_elements": "40"}


def local_config(run_dir, **overrides) -> C.TrainConfig:
    base = {**SMOKE, "cluster.run_dir": str(run_dir), "eval.at_end": "false", "logging.progress_bar": "false",
            "model": E2E_MODEL}
    if E2E_MODEL == "tiny-lm":
        base.update({"rollout.prompt.include_screenshot": "false", "rollout.prompt.include_axtree": "true"})
    base.update({k: str(v) for k, v in overrides.items()})
    cfg = C.build_config("local", base, environ={})
    C.validate_config(cfg)
    return cfg


def scrape_metrics() -> str:
    """The Prometheus text of this node's metrics endpoint (where Ray exports custom metrics)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return requests.get(url, timeout=10).text


def check_common(summary: dict, run_dir, steps: int, workers: int = 2) -> None:
    # every worker ends at the learner's final version
    assert summary["steps"] == steps
    assert summary["worker_versions"] == [summary["learner_version"]] * workers
    assert summary["learner_version"] >= 1
    # the episode accounting balances: started = trained + dropped by reason
    acc = summary["accounting"]
    assert acc["balanced"], acc
    assert acc["started"] == acc["trained"] + sum(acc["dropped"].values())
    assert acc["trained"] > 0
    assert acc["groups_trained"] == steps * 2  # local preset: 2 groups per step
    # the run folder
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "reward.png", "success_rate.png", "throughput.png"):
        assert (run_dir / name).is_file(), name
    assert C.load_config(run_dir / "config.yaml").cluster.total_steps == steps
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert list((run_dir / "viewer").glob("*.html"))
    groups = {g.group_id: g for g in read_trajectories(run_dir / "trajectories")}
    trained_ids = [gid for s in summary["trained_steps"] for gid in s["group_ids"]]
    assert set(trained_ids) <= set(groups) and len(trained_ids) == len(set(trained_ids))
    rows = [r for r in read_metrics(run_dir) if "policy_version" in r and "event" not in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))


# --- sync ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sync_run(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sync") / "run"
    cfg = local_config(run_dir, **{
        "cluster.total_steps": 3, "cluster.run_name": "e2e-sync",
        "cluster.env_placement": "ray_actors", "cluster.env_servers_per_worker": 1, "cluster.env_server_num_cpus": 0.5,
    })
    scraped: dict = {}

    def during_run(trainer, step):
        # While the run is live (actors up, step 1 logged): the custom metrics must be on the
        # cluster's metrics endpoint. Ray exports every few seconds; wait up to 60 s.
        if step != 1:
            return
        import ray

        scraped["hosts"] = len(trainer.env_hosts)
        scraped["urls"] = [u for h in trainer.env_hosts for u in ray.get(h.urls.remote())]
        scraped["worker_urls"] = [u for w in trainer.workers for u in ray.get(w.env_urls.remote())]
        scraped["worker_pids"] = [p for w in trainer.workers for p in ray.get(w.env_server_pids.remote())]
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = scrape_metrics()
            if re.search(r'^ray_bgrpo_policy_version\{[^}]*run="e2e-sync"[^}]*\} 1(\.0)?$', text, re.M):
                break
            time.sleep(2)
        scraped["text"] = text

    t0 = time.monotonic()
    summary = driver.train(cfg, run_dir, on_step=during_run)
    print(f"\nsync e2e run: {time.monotonic() - t0:.0f} s")
    return summary, run_dir, scraped


def test_sync_run_end_to_end(sync_run):
    summary, run_dir, _ = sync_run
    check_common(summary, run_dir, steps=3)
    assert summary["learner_version"] == 3  # every step stepped the optimizer
    # on-policy: every trained token was sampled by the version the learner trained
    for s in summary["trained_steps"]:
        assert s["min_token_version"] == s["max_token_version"] == s["learner_version"], s
    # ... which the Parquet files confirm token by token
    groups = {g.group_id: g for g in read_trajectories(run_dir / "trajectories")}
    for s in summary["trained_steps"]:
        for gid in s["group_ids"]:
            assert {st.policy_version for t in groups[gid].trajectories for st in t.steps} == {s["learner_version"]}
    # checkpoints every 2 steps, keep 2: step 2 and the final step 3
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]


def test_custom_metrics_on_the_cluster_metrics_endpoint(sync_run):
    _, _, scraped = sync_run
    text = scraped["text"]
    assert re.search(r'^ray_bgrpo_policy_version\{[^}]*run="e2e-sync"[^}]*\} 1(\.0)?$', text, re.M), text[-2000:]
    for name in ("ray_bgrpo_episodes_started", "ray_bgrpo_env_steps", "ray_bgrpo_success_rate",
                 "ray_bgrpo_reward_mean", "ray_bgrpo_learner_step_s_bucket", "ray_bgrpo_weight_sync_s_count"):
        assert name in text, name


def test_env_servers_as_ray_actors(sync_run):
    """Env servers as CPU-only Ray actors (cluster.env_placement = ray_actors): one host per
    worker, the workers use exactly the hosts' servers, and no worker embeds a server."""
    summary, _, seen = sync_run
    assert seen["hosts"] == 2
    assert sorted(seen["worker_urls"]) == sorted(seen["urls"])  # workers use the hosts' servers
    assert all(u.startswith("http://127.0.0.1:") for u in seen["urls"])  # one node: loopback only
    assert seen["worker_pids"] == [None, None]  # no embedded servers in the workers
    assert summary["accounting"]["balanced"] and summary["worker_versions"] == [summary["learner_version"]] * 2


def test_trained_groups_are_instances_of_the_sampler(sync_run):
    summary, _, _ = sync_run
    instances = [tuple(i) for s in summary["trained_steps"] for i in s["instances"]]
    assert len({(t, seed) for t, seed, _ in instances}) == len(instances)  # no instance trained twice
    assert all(t == "miniwob.click-test" and 0 <= seed < 1_000_000 for t, seed, _ in instances)


# --- async -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_run(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async") / "run"
    cfg = local_config(run_dir, **{
        "cluster.total_steps": 3, "cluster.mode": "async", "cluster.max_staleness": 1,
        "cluster.run_name": "e2e-async", "eval.at_end": "true", "eval.episodes_per_task": 1,
    })
    t0 = time.monotonic()
    summary = driver.train(cfg, run_dir)
    print(f"\nasync e2e run: {time.monotonic() - t0:.0f} s; overlap per step: {summary['async_overlap']}")
    return summary, run_dir


@pytest.mark.slow  # ~5 min on 2 shared cores (drain of in-flight groups + eval)
def test_async_never_trains_on_a_group_older_than_max_staleness(async_run):
    summary, run_dir = async_run
    check_common(summary, run_dir, steps=3)
    groups = {g.group_id: g for g in read_trajectories(run_dir / "trajectories")}
    for s in summary["trained_steps"]:
        assert s["learner_version"] - s["min_token_version"] <= 1, s
        for gid in s["group_ids"]:  # from the versions recorded on every step of every episode
            versions = [st.policy_version for t in groups[gid].trajectories for st in t.steps]
            assert min(versions) >= s["learner_version"] - 1, (s, versions)
    # groups finished after the last step (still in flight when it ended) are counted, not lost
    assert "run_ended" in summary["accounting"]["dropped"]


@pytest.mark.slow  # ~5 min on 2 shared cores (drain of in-flight groups + eval)
def test_async_workers_keep_sampling_while_the_learner_trains(async_run):
    summary, _ = async_run
    overlap = summary["async_overlap"]
    assert len(overlap) == 3
    # Every learner step ran while both workers had a group in flight (they were not paused).
    assert all(o["rollout_in_flight_during_train"] == 2 for o in overlap), overlap


@pytest.mark.slow  # ~5 min on 2 shared cores (drain of in-flight groups + eval)
def test_async_eval_reports_per_task_success(async_run):
    summary, run_dir = async_run
    assert len(summary["eval"]) == 1
    ev = summary["eval"][0]
    assert ev["eval_policy_version"] == summary["learner_version"]
    assert 0.0 <= ev["eval/miniwob.click-test/success_rate"] <= 1.0
    assert list((run_dir / "eval" / "trajectories").glob("*.parquet"))
    assert summary["accounting"]["eval_episodes"] == 1
