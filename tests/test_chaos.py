"""Chaos: one real run (real Chromium on MiniWoB, env servers, Ray workers, learner) in which the
test kills, at seeded moments, a Chromium process, an env server, a rollout worker and the learner.

The run must finish its steps, its books must balance (every episode started is trained or
dropped with a counted reason), no infrastructure failure may be scored (read back from the
Parquet trajectories: a failed episode has no return and never enters a batch), and no process
the run started may outlive it. The same code makes the README's fault table:
`python -m cluster.chaos --config local ...` (cluster/chaos.py)."""

from __future__ import annotations

import psutil
import pytest

from cluster import chaos

pytestmark = [pytest.mark.slow, pytest.mark.browser]

STEPS = 6


def _chaos_args(run_dir) -> list[str]:
    return ["--config", "local", "--cluster.run_dir", str(run_dir), "--cluster.run_name", "chaos",
            "--cluster.total_steps", str(STEPS), "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "1",
            "--warm_start.enabled", "false", "--eval.before_training", "false", "--eval.at_end", "false",
            "--env.reset_mode", "page", "--grpo.num_generations", "2", "--logging.progress_bar", "false"]


def _env_processes() -> set[int]:
    """Live processes of any env pool: env servers and the Chromium they launched inherit the pool's
    tag variable, so they are found even after their parent died and they were re-parented."""
    from envs.browsergym.pool import POOL_TAG_VAR

    found = set()
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and POOL_TAG_VAR in proc.environ():
                found.add(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_run_survives_chromium_env_server_worker_and_learner_kills(ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    before = _env_processes()
    result = chaos.run(_chaos_args(tmp_path / "run"), list(chaos.KINDS), seed=0)
    summary, injections = result["summary"], result["injections"]

    assert summary["steps"] == STEPS and summary["learner_version"] >= STEPS
    done = {i["kind"]: i for i in injections}
    assert set(done) == set(chaos.KINDS)
    for kind, inj in done.items():
        assert inj["at"] and inj["pid"], (kind, inj)  # each kill really happened
    rows = {r["kind"]: r for r in result["table"]}
    for kind in chaos.KINDS:
        assert rows[kind]["injected"] == 1 and rows[kind]["recover_s"], rows[kind]  # training went on after it
    acc = summary["accounting"]
    assert acc["balanced"] and acc["started"] == acc["trained"] + sum(acc["dropped"].values()), acc
    assert summary["worker_restarts"] >= 1 and summary.get("learner_restarts", 0) >= 1

    table = pq.read_table(str(tmp_path / "run" / "trajectories")).to_pandas()
    failed = table[table["status"] == "failed"]
    assert len(failed) >= 1  # the kills failed episodes ...
    assert failed["episode_return"].isna().all()  # ... and none of them carries a score

    leftovers = _env_processes() - before  # env servers and browsers of killed workers included
    assert not leftovers, {p: psutil.Process(p).cmdline()[:3] for p in leftovers if psutil.pid_exists(p)}
