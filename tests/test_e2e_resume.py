"""A run interrupted (Ctrl-C) right after a checkpoint, then resumed with `--resume RUN_DIR`: the
step count and the data cursor continue, no task instance is trained twice, nothing is left running."""

from __future__ import annotations

import time

import pytest

from cluster import config as C
from cluster import driver
from cluster.metrics import read_metrics
from tests.test_e2e import local_config

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_interrupt_after_checkpoint_then_resume(ray_cluster, tmp_path):
    import ray

    run_dir = tmp_path / "run"
    cfg = local_config(run_dir, **{"cluster.total_steps": 4, "checkpoint.every_steps": 2})

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
