"""A run interrupted (Ctrl-C) right after a checkpoint, then resumed with `--resume RUN_DIR`: the
step count and the data cursor continue, no task instance is trained twice, nothing is left running.

Both runs use the browser-free recorded env (real env servers, sessions, Ray workers and learner;
no Chromium): what is checked here is the driver's checkpoint, cursor and shutdown, which do not
depend on the page. On Chromium the sync interrupt + resume took 164 s of a loaded 2-core machine
(--durations) against ~60 s; the browser's own clean-up on Ctrl-C is tests/test_env_pool.py's, and
the session's no-orphan check (tests/fixtures/env.py) fails the suite if a browser outlives it."""

from __future__ import annotations

import time

import pytest

from cluster import config as C
from cluster import driver
from cluster.metrics import read_metrics

pytestmark = pytest.mark.slow  # no browser: both runs are on the recorded env


def test_interrupt_after_checkpoint_then_resume(ray_cluster, tmp_path):
    import ray

    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    cfg = recorded_config(run_dir, **{"cluster.total_steps": 4, "checkpoint.every_steps": 2,
                                      "cluster.run_name": "sync-resume"})

    def interrupt(trainer, step):
        if step == 2:  # after step 2's checkpoint was written
            raise KeyboardInterrupt("test: Ctrl-C after the step-2 checkpoint")

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        driver.train(cfg, run_dir, on_step=interrupt)
    # Every actor and placement group is gone: all logical CPUs are free again.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert not (run_dir / "summary.json").exists()

    # --- resume from the run folder's resolved config and latest checkpoint ---
    cl = C.parse_cli(["--resume", str(run_dir), "--logging.progress_bar", "false"], environ={})
    assert cl.config.cluster.total_steps == 4
    summary = driver.train(cl.config, run_dir, resume=True)
    print(f"\ninterrupt + resume: {time.monotonic() - t0:.0f} s")

    assert summary["steps"] == 4 and summary["learner_version"] == 4
    assert [s["step"] for s in summary["trained_steps"]] == [3, 4]  # the step count continued
    assert summary["worker_versions"] == [4, 4]
    assert summary["trained_steps"][0]["learner_version"] == 2  # resumed weights are version 2
    before = [tuple(i) for i in summary["trained_before_resume"]]
    after = [tuple(i) for s in summary["trained_steps"] for i in s["instances"]]
    assert len(before) == 4 and len(after) == 4
    # the data cursor continued: later sampler positions, and no instance trained twice
    assert min(i[2] for i in after) > max(i[2] for i in before)
    assert not {(t, s) for t, s, _ in before} & {(t, s) for t, s, _ in after}
    assert summary["accounting"]["balanced"]
    steps_logged = [r["step"] for r in read_metrics(run_dir) if "policy_version" in r and "event" not in r]
    assert steps_logged == [1, 2, 3, 4]


def test_async_resume_reissues_the_groups_in_flight_at_the_checkpoint(ray_cluster, tmp_path):
    """An async run always has groups in flight (and maybe buffered) when it checkpoints: the sampler
    has handed them out, the learner has not trained them. Interrupted there and resumed, every
    sampler index must end up trained exactly once or dropped with a counted reason: the groups
    unsettled at the checkpoint are re-issued (same task, seed and index), never skipped. Runs on the
    browser-free recorded env (real env servers and sessions, no Chromium) to stay quick."""
    import json

    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    cfg = recorded_config(run_dir, **{"cluster.mode": "async", "cluster.total_steps": 2,
                                      "checkpoint.every_steps": 1, "cluster.run_name": "async-resume"})

    def interrupt(trainer, step):
        if step == 1:
            raise KeyboardInterrupt("test: Ctrl-C after the step-1 checkpoint")

    with pytest.raises(KeyboardInterrupt):
        driver.train(cfg, run_dir, on_step=interrupt)
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    cursor = json.loads((ckpt / "cursor.json").read_text())
    trained_at_ckpt = {i[2] for i in cursor["trained_instances"]}
    handed_out = set(range(cursor["sampler"]["cursor"]))
    unsettled = handed_out - trained_at_ckpt - {i[2] for i in cursor.get("dropped_instances", [])}
    assert unsettled, "an async run has groups in flight at every checkpoint"

    cl = C.parse_cli(["--resume", str(run_dir), "--logging.progress_bar", "false"], environ={})
    summary = driver.train(cl.config, run_dir, resume=True)
    assert summary["steps"] == 2 and summary["accounting"]["balanced"]

    trained = [tuple(i) for i in summary["trained_before_resume"]]
    trained += [tuple(i) for s in summary["trained_steps"] for i in s["instances"]]
    dropped = [tuple(i) for i in summary.get("dropped_before_resume", []) + summary.get("dropped_instances", [])]
    assert all(reason for *_, reason in dropped)  # every drop has its counted reason
    indices = [i[2] for i in trained] + [d[2] for d in dropped]
    assert sorted(indices) == list(range(max(indices) + 1)), (trained, dropped)  # each index exactly once
    # The unsettled groups were played again as the same task instance.
    instance_of = {i[2]: (i[0], i[1]) for i in trained + [d[:3] for d in dropped]}
    for task, seed, index in cursor["unsettled_instances"]:
        assert instance_of[index] == (task, seed)
    assert {i for _, _, i in cursor["unsettled_instances"]} == unsettled
