"""Evaluation has capacity of its own, and a failed evaluation is reported as failed, never as 0 %.

The qwen3-vl-2b-miniwob preset fills every session its env servers accept (rollout.num_sessions =
env_servers_per_worker x env.max_sessions); the evaluation worker used to open its session on the
first worker's servers, was refused, and the run logged `eval_success_rate 0.0`. These runs keep
that structure scaled down to one worker (1 server x 2 sessions, both used by the worker) on the
browser-free recorded env: real env servers with real session limits, the tiny VLM, the learner.
"""

from __future__ import annotations

import pytest

from cluster import config as C
from cluster import driver
from tests.test_recorded_env import TASK, recorded_config


def _group(task: str, outcomes: list[tuple[str, float]]):
    from core.trajectory import Trajectory, TrajectoryGroup

    return TrajectoryGroup(f"{task}-g", task, 0, [
        Trajectory(episode_id=f"{task}-{i}", group_id=f"{task}-g", task=task, seed=0, status=s, episode_return=r,
                   failure_reason="env_error: refused (CAPACITY_REACHED)" if s == "failed" else "")
        for i, (s, r) in enumerate(outcomes)])


def test_eval_record_counts_exactly_the_successful_episodes():
    """Per-task and overall rates are the episodes' own success flags: a finished episode with a
    positive return is a success; a truncated one is not, whatever its return."""
    from core.trajectory import FINISHED, TRUNCATED
    from cluster.eval import metrics_record, summarize

    groups = [_group("a", [(FINISHED, 1.0), (FINISHED, 0.0), (TRUNCATED, 1.0)]),
              _group("b", [(FINISHED, 0.5)]),
              _group("a", [(FINISHED, 1.0)])]
    ev = metrics_record(summarize([(g.task, 0) for g in groups], groups))
    assert ev["eval_status"] == "ok" and ev["eval_episodes"] == 5 and ev["eval_episodes_failed"] == 0
    assert ev["eval/a/success_rate"] == 2 / 4 and ev["eval/b/success_rate"] == 1.0
    assert ev["eval_success_rate"] == 3 / 5


def test_eval_record_with_a_failed_episode_has_no_success_rate():
    """One infrastructure failure makes the evaluation `failed`, with its count and reason, and no
    success-rate key at all (neither 0 % nor a rate over the survivors). A group that raised
    (timed out) counts as failed too."""
    from core.trajectory import FAILED, FINISHED
    from cluster.eval import metrics_record, summarize

    groups = [_group("a", [(FINISHED, 1.0), (FAILED, 0.0)]), TimeoutError("group timed out")]
    ev = metrics_record(summarize([("a", 0), ("b", 1)], groups))
    assert ev["eval_status"] == "failed" and ev["eval_episodes"] == 3 and ev["eval_episodes_failed"] == 2
    assert ev["eval_failure_reasons"] == {"env_error": 1, "TimeoutError": 1}
    assert "CAPACITY" in ev["eval_failure_example"]
    assert not any("success_rate" in k for k in ev)


# Each is a whole one-step training run: 440 s and 292 s on the shared 2-core machine under load (--durations).
slow = pytest.mark.slow


def _preset_layout_scaled_down(run_dir, **overrides) -> C.TrainConfig:
    return recorded_config(run_dir, **{
        "cluster.num_rollout_workers": 1, "cluster.env_servers_per_worker": 1, "env.max_sessions": 2,
        "rollout.num_sessions": 2, "grpo.num_generations": 2, "cluster.groups_per_step": 1,
        "cluster.total_steps": 1, "checkpoint.save_final": "false",
        "eval.at_end": "true", "eval.episodes_per_task": 2, **overrides,
    })


@slow
def test_preset_fills_every_session_of_its_env_servers():
    """The structure the tests below scale down: the preset's workers use every session."""
    cfg = C.build_config("qwen3-vl-2b-miniwob", {}, environ={})
    assert cfg.rollout.num_sessions == cfg.cluster.env_servers_per_worker * cfg.env.max_sessions
    assert cfg.cluster.env_placement == "ray_actors" and (cfg.eval.every_steps or cfg.eval.at_end)


@slow
def test_evaluation_gets_its_own_env_capacity(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _preset_layout_scaled_down(run_dir, **{"cluster.env_placement": "ray_actors", "cluster.run_name": "eval-cap"})
    assert cfg.rollout.num_sessions == cfg.cluster.env_servers_per_worker * cfg.env.max_sessions
    summary = driver.train(cfg, run_dir)
    (ev,) = summary["eval"]
    assert ev["eval_status"] == "ok", ev
    assert ev["eval_episodes"] == 2 and ev["eval_episodes_failed"] == 0
    # The reported rates are the success flags of the episodes the evaluation wrote.
    from core.trajectory import read_trajectories

    written = [t for g in read_trajectories(run_dir / "eval" / "trajectories") for t in g.trajectories]
    assert len(written) == 2 and all(t.task == TASK for t in written)
    successes = sum(t.success for t in written)
    assert ev["eval_success_rate"] == ev[f"eval/{TASK}/success_rate"] == successes / 2, (ev, written)
    assert summary["accounting"]["eval_episodes"] == 2


@slow
def test_refused_evaluation_is_reported_failed_with_a_count(ray_cluster, tmp_path):
    """Remote servers with no session to spare (a real server at max_sessions, held by the
    training worker): every evaluation session is refused. The evaluation is `failed` with the
    count and the reason; no success rate is logged at all."""
    from cluster.metrics import read_metrics
    from envs.browsergym.config import EnvConfig
    from envs.browsergym.pool import EnvServerPool

    run_dir = tmp_path / "run"
    with EnvServerPool(num_servers=1, env_config=EnvConfig(task=TASK, max_sessions=2)) as pool:
        cfg = _preset_layout_scaled_down(run_dir, **{
            "cluster.env_placement": "remote", "cluster.env_server_urls": f"[{pool.urls[0]}]",
            "cluster.run_name": "eval-refused"})
        summary = driver.train(cfg, run_dir)
    (ev,) = summary["eval"]
    assert ev["eval_status"] == "failed" and ev["eval_episodes"] == 2 and ev["eval_episodes_failed"] == 2, ev
    assert "env_error" in ev["eval_failure_reasons"] and "CAPACITY" in ev["eval_failure_example"]
    assert not any("success_rate" in k for k in ev)
    logged = [r for r in read_metrics(run_dir) if r.get("event") == "eval"]
    assert len(logged) == 1 and not any("success_rate" in k for k in logged[0])
