"""Metrics file, plots, trackers and the task sampler (no Ray needed)."""

from __future__ import annotations

import json

import pytest

from cluster import plots
from cluster.config import ConfigError, LoggingConfig, SamplerConfig
from cluster.metrics import RAY_METRICS, MetricsLogger, check_trackers_installed, read_metrics
from cluster.sampler import TaskSampler


def _logger(tmp_path, **kw):
    return MetricsLogger(tmp_path, LoggingConfig(**kw), "test-run", {"a": 1}, ray_metrics=False)


def test_metrics_jsonl_records_and_torn_lines(tmp_path):
    m = _logger(tmp_path)
    for step in range(1, 4):
        m.log({"reward_mean": step / 10, "success_rate": 0.5, "samples_per_s": 2.0, "nan": float("nan")}, step=step)
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward_')  # a run killed mid-write
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["reward_mean"] == pytest.approx(0.2)
    assert rows[0]["nan"] is None  # valid JSON, not NaN


def test_plots_written_and_cli(tmp_path, capsys):
    m = _logger(tmp_path)
    for step in range(1, 6):
        m.log({"reward_mean": step * 0.1, "success_rate": step * 0.2, "samples_per_s": 1.5,
               "env_steps_per_s": 3.0, "collect_s": 2.0, "learner_step_s": 0.5, "weight_sync_s": 0.1}, step=step)
    m.log({"event": "eval", "eval_success_rate": 0.5}, step=5)
    m.close()
    written = plots.write_plots(tmp_path)
    names = {p.name for p in written}
    assert {"reward.png", "success_rate.png", "throughput.png", "timing.png"} <= names
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert plots.main([str(tmp_path)]) == 0
    assert plots.main([str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().out


def test_missing_tracker_is_a_config_error(monkeypatch):
    import importlib.util

    # The dev set-up installs all three (the `trackers` extra): hide them to see the error a user
    # without them gets. tests/test_run_outputs.py runs each installed tracker for real.
    real_find_spec = importlib.util.find_spec
    hidden = {"trackio", "tensorboard", "wandb"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real_find_spec(name, *a))
    for name in sorted(hidden):
        with pytest.raises(ConfigError, match=f"{name}.*not installed"):
            check_trackers_installed(LoggingConfig(trackers=[name]))
        with pytest.raises(ConfigError, match="not installed"):
            LoggingConfig(trackers=[name]).validate()


def test_per_task_figures_count_trainable_episodes_only():
    from core.trajectory import FAILED, Trajectory, TrajectoryGroup

    def group(task, returns, failed=0):
        trajs = [Trajectory(f"e{i}", f"g-{task}-{len(returns)}", task, 1,
                            steps=[] if i < failed else [_step()], status=FAILED if i < failed else "finished",
                            episode_return=r) for i, r in enumerate(returns)]
        return TrajectoryGroup(f"g-{task}-{len(returns)}", task, 1, trajs)

    from cluster.metrics import per_task_figures

    figures = per_task_figures([group("a", [1.0, 0.0]), group("a", [1.0, 1.0, 0.0, 0.0]), group("b", [0.0, 0.5], failed=1)])
    assert figures == {"task/a/success_rate": 0.5, "task/a/reward_mean": 0.5,
                       "task/b/success_rate": 1.0, "task/b/reward_mean": 0.5}  # b: the failed episode is not counted


def _step():
    from core.trajectory import Step

    return Step(index=0, prompt_ids=[1], completion_ids=[2], logprobs=[-1.0], policy_version=0)


def test_ray_metric_names_are_valid_prometheus_names():
    import re

    for key in RAY_METRICS:
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", f"bgrpo_{key}")


# --- sampler ----------------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_never_repeats_a_training_seed():
    cfg = SamplerConfig(tasks=["click-test", "miniwob.click-button"], train_seeds=[0, 50], eval_seeds=[100, 110])
    a, b = TaskSampler(cfg, seed=3), TaskSampler(cfg, seed=3)
    xs = [a.next() for _ in range(40)]
    assert xs == [b.next() for _ in range(40)]
    assert {x.task for x in xs} == {"miniwob.click-test", "miniwob.click-button"}
    for task in ("miniwob.click-test", "miniwob.click-button"):
        seeds = [x.seed for x in xs if x.task == task]
        assert len(seeds) == len(set(seeds)) and all(0 <= s < 50 for s in seeds)
    assert [x.index for x in xs] == list(range(40))


def test_eval_seeds_are_held_out():
    cfg = SamplerConfig(tasks=["click-test"], train_seeds=[0, 100], eval_seeds=[100, 105])
    s = TaskSampler(cfg)
    train = {s.next().seed for _ in range(100)}
    held_out = {i.seed for i in s.eval_instances(5)}
    assert train == set(range(100)) and held_out == set(range(100, 105)) and not train & held_out
    assert s.eval_instances(3) == s.eval_instances(3)  # the same instances at every evaluation


def test_sampler_state_resumes_the_stream():
    cfg = SamplerConfig(tasks=["click-test", "click-button", "focus-text"], weighting="learnable")
    a = TaskSampler(cfg, seed=1)
    for _ in range(7):
        inst = a.next()
        a.record(inst.task, [True, False])
        a.settle(inst.index)  # trained
    state = json.loads(json.dumps(a.state_dict()))  # it is saved as JSON in the checkpoint
    b = TaskSampler(cfg, seed=1)
    b.load_state_dict(state)
    assert [a.next() for _ in range(10)] == [b.next() for _ in range(10)]
    with pytest.raises(ValueError, match="different task list"):
        TaskSampler(SamplerConfig(tasks=["click-test"]), seed=1).load_state_dict(state)


def test_instances_unsettled_at_a_checkpoint_are_reissued_after_resume():
    """Async runs checkpoint with groups in flight or buffered: handed out (the cursor counted them)
    but neither trained nor dropped. A resumed sampler hands exactly those out again first, as the
    same task instances, then continues the stream where it stopped."""
    cfg = SamplerConfig(tasks=["click-test", "click-button"])
    a = TaskSampler(cfg, seed=2)
    handed = [a.next() for _ in range(6)]
    for inst in handed[:2] + handed[4:5]:
        a.settle(inst.index)  # trained or dropped with a reason
    assert a.unsettled() == [handed[2], handed[3], handed[5]]
    state = json.loads(json.dumps(a.state_dict()))
    b = TaskSampler(cfg, seed=2)
    b.load_state_dict(state)
    assert [b.next() for _ in range(3)] == [handed[2], handed[3], handed[5]]
    fresh = [b.next() for _ in range(4)]
    assert fresh == [a.next() for _ in range(4)] and [i.index for i in fresh] == [6, 7, 8, 9]
    # still unsettled in b until settled: a checkpoint of b would re-issue them again
    assert [i.index for i in b.unsettled()] == [2, 3, 5, 6, 7, 8, 9]


def test_learnable_weighting_prefers_tasks_with_signal():
    cfg = SamplerConfig(tasks=["click-test", "click-button", "focus-text"], weighting="learnable", min_weight=0.05)
    s = TaskSampler(cfg, seed=0)
    s.record("click-test", [True] * 8)            # solved: no GRPO signal
    s.record("click-button", [False] * 8)         # never solved: no signal
    s.record("focus-text", [True, False] * 4)     # learnable
    assert s.weights() == {"miniwob.click-test": 0.05, "miniwob.click-button": 0.05, "miniwob.focus-text": 1.0}
    picks = [s.next().task for _ in range(200)]
    assert picks.count("miniwob.focus-text") > 150
    uniform = TaskSampler(SamplerConfig(tasks=cfg.tasks), seed=0)
    assert set(uniform.weights().values()) == {1.0}
