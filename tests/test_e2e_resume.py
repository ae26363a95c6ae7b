"""A run interrupted (Ctrl-C) right after a checkpoint, or its driver SIGKILLed mid-checkpoint or
after one, then resumed with `--resume RUN_DIR`: the step count and the data cursor continue from the
last complete checkpoint, no task instance is trained twice, the run folder records each step once,
and nothing is left running (after `bgrpo cleanup`, which a resume also does first).

Two scenarios, each one run and its resumes: Ctrl-C in an async run (groups in flight at the
checkpoint, Ray's resources all freed by the interrupt), and the driver SIGKILLed twice in a sync
run (a torn checkpoint, `bgrpo cleanup`, the step count, cursor and weights' version continuing
over three attempts). A separate sync Ctrl-C + resume run (75 s of the suite) checked nothing these
two do not: its checks (Ray freed, no summary.json after an interrupt, steps and versions continuing,
no instance trained twice) are asserted on these runs.

Both use the browser-free recorded env (real env servers, sessions, Ray workers and learner;
no Chromium): what is checked here is the driver's checkpoint, cursor and shutdown, which do not
depend on the page. On Chromium the sync interrupt + resume took 164 s of a loaded 2-core machine
(--durations) against ~60 s; the browser's own clean-up on Ctrl-C is tests/test_env_pool.py's, and
the session's no-orphan check (tests/fixtures/env.py) fails the suite if a browser outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import config as C
from cluster import driver
from cluster.metrics import read_metrics
from cluster.run_processes import PROCESSES_FILE, RUN_TAG_VAR
from core.processes import same_process
from envs.browsergym.pool import find_tagged_processes
from learner.checkpoint import WRITE_PAUSE_VAR

pytestmark = pytest.mark.slow  # no browser: both runs are on the recorded env


def _wait_until_ray_is_free() -> None:
    """Every actor and placement group of an interrupted run is gone: all logical CPUs free again."""
    import ray

    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_async_resume_reissues_the_groups_in_flight_at_the_checkpoint(ray_cluster, tmp_path):
    """An async run always has groups in flight (and maybe buffered) when it checkpoints: the sampler
    has handed them out, the learner has not trained them. Interrupted there (Ctrl-C: every Ray
    actor and placement group of the run released, no summary.json) and resumed, the step count
    continues and every sampler index ends up trained exactly once or dropped with a counted
    reason: the groups unsettled at the checkpoint are re-issued (same task, seed and index), never
    skipped. Runs on the browser-free recorded env (real env servers and sessions, no Chromium)."""
    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    cfg = recorded_config(run_dir, **{"cluster.mode": "async", "cluster.total_steps": 2,
                                      "checkpoint.every_steps": 1, "cluster.run_name": "async-resume"})

    def interrupt(trainer, step):
        if step == 1:
            raise KeyboardInterrupt("test: Ctrl-C after the step-1 checkpoint")

    with pytest.raises(KeyboardInterrupt):
        driver.train(cfg, run_dir, on_step=interrupt)
    _wait_until_ray_is_free()
    assert not (run_dir / "summary.json").exists()
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    cursor = json.loads((ckpt / "cursor.json").read_text())
    trained_at_ckpt = {i[2] for i in cursor["trained_instances"]}
    handed_out = set(range(cursor["sampler"]["cursor"]))
    unsettled = handed_out - trained_at_ckpt - {i[2] for i in cursor.get("dropped_instances", [])}
    assert unsettled, "an async run has groups in flight at every checkpoint"

    cl = C.parse_cli(["--resume", str(run_dir), "--logging.progress_bar", "false"], environ={})
    summary = driver.train(cl.config, run_dir, resume=True)
    assert summary["steps"] == 2 and summary["learner_version"] == 2 and summary["accounting"]["balanced"]
    # summary.json describes the whole run: both attempts' steps, each once
    assert [s["step"] for s in summary["trained_steps"]] == [1, 2]  # the step count continued
    assert [a["resumed_from_step"] for a in summary["attempts"]] == [None, 1]
    assert summary["worker_versions"] == [2, 2]
    steps_logged = [r["step"] for r in read_metrics(run_dir) if "policy_version" in r and "event" not in r]
    assert steps_logged == [1, 2]

    trained = [tuple(i) for s in summary["trained_steps"] for i in s["instances"]]  # the whole run
    dropped = [tuple(i) for i in summary["dropped_instances"]]
    assert all(reason for *_, reason in dropped)  # every drop has its counted reason
    indices = [i[2] for i in trained] + [d[2] for d in dropped]
    assert sorted(indices) == list(range(max(indices) + 1)), (trained, dropped)  # each index exactly once
    # The unsettled groups were played again as the same task instance.
    instance_of = {i[2]: (i[0], i[1]) for i in trained + [d[:3] for d in dropped]}
    for task, seed, index in cursor["unsettled_instances"]:
        assert instance_of[index] == (task, seed)
    assert {i for _, _, i in cursor["unsettled_instances"]} == unsettled


# --- the driver SIGKILLed: mid-checkpoint, then after one; `--resume` and `bgrpo cleanup` ------------

ROOT = Path(__file__).resolve().parents[1]


def _start_driver(tmp_path, name, args, pause=""):
    """`bgrpo train ARGS` in its own process (a SIGKILL must hit the driver alone), output to a file."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", RUN_TAG_VAR, WRITE_PAUSE_VAR)}
    env.update({"PYTHONPATH": str(ROOT), WRITE_PAUSE_VAR: pause})
    out = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def _wait_for(what, proc, tmp_path, name, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while not what():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{name}: condition not met (exit {proc.poll()}):\n{(tmp_path / f'{name}.log').read_text()[-4000:]}")
        time.sleep(0.2)


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _survivors(run_dir):
    """Processes of any attempt of the run still alive: tagged, or recorded and the same process."""
    record = json.loads((run_dir / PROCESSES_FILE).read_text())
    alive = []
    for attempt in record["attempts"]:
        alive += find_tagged_processes(RUN_TAG_VAR, attempt["tag"])
        alive += [p["pid"] for p in attempt["processes"] if same_process(p["pid"], p["start"])]
    return sorted(set(alive)), record


def test_driver_sigkilled_mid_checkpoint_and_after_one_resumes_and_leaves_nothing(ray_cluster, tmp_path):
    """Attempt 1 is SIGKILLed while the step-2 checkpoint is being written (a test hook pauses the save
    between its files and its publication): `latest` stays on step 1 and the torn folder is never
    picked. Attempt 2 (`--config local --resume DIR`, what `make run ARGS=...` runs) stops what attempt
    1 left, continues from step 1, and is SIGKILLed after its step-2 checkpoint, while it plays step 3;
    `bgrpo cleanup` then stops everything it left. Attempt 3 finishes: each step once in the records."""
    from tests.test_recorded_env import recorded_config

    run_dir = tmp_path / "run"
    cfg = recorded_config(run_dir, **{"cluster.total_steps": 3, "checkpoint.every_steps": 1,
                                      "cluster.num_rollout_workers": 1, "cluster.groups_per_step": 1,
                                      "grpo.num_generations": 2, "rollout.max_steps": 1,  # short steps
                                      "cluster.num_cpus": 4, "cluster.run_name": "sigkill-resume"})
    C.save_config(cfg, tmp_path / "config.yaml")
    ckpts = run_dir / "checkpoints"

    def latest():
        return (ckpts / "latest").read_text().strip() if (ckpts / "latest").exists() else ""

    # --- attempt 1: killed in the middle of writing step 2's checkpoint ---
    first = _start_driver(tmp_path, "first", ["--config", str(tmp_path / "config.yaml")], pause="step-000002:300")
    _wait_for(lambda: latest() == "step-000001" and list(ckpts.glob(".tmp-step-000002-*")), first, tmp_path, "first")
    _kill(first)
    assert latest() == "step-000001" and list(ckpts.glob(".tmp-step-000002-*"))  # torn, not published
    recorded = json.loads((run_dir / PROCESSES_FILE).read_text())["attempts"][0]["processes"]
    commands = " ".join(p["cmdline"] for p in recorded)
    assert "raylet" in commands and "envs.browsergym.server.app" in commands, commands  # what it started

    # --- attempt 2: resumes from step 1 (cleaning up first), killed after its step-2 checkpoint ---
    second = _start_driver(tmp_path, "second", ["--config", "local", "--resume", str(run_dir)])
    _wait_for(lambda: latest() == "step-000002", second, tmp_path, "second")
    _kill(second)
    log = (tmp_path / "second.log").read_text()
    assert "--config local ignored" in log
    resumes = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert [r["from_step"] for r in resumes] == [1]  # the last complete checkpoint, not the torn one
    survivors, record = _survivors(run_dir)
    assert len(record["attempts"]) == 2
    first_tag = record["attempts"][0]["tag"]
    assert not find_tagged_processes(RUN_TAG_VAR, first_tag)  # attempt 2 started after attempt 1's were gone

    # --- bgrpo cleanup: nothing of either attempt survives ---
    from cluster.cli import main as bgrpo

    assert bgrpo(["cleanup", str(run_dir)]) == 0
    survivors, _ = _survivors(run_dir)
    assert survivors == []

    # --- attempt 3 (in-process, on the session's Ray): finishes; the run folder has every step once ---
    cl = C.parse_cli(["--resume", str(run_dir)], environ={})
    assert cl.config.cluster.total_steps == 3
    _check_whole_run(driver.train(cl.config, run_dir, resume=True), run_dir)


def _check_whole_run(summary, run_dir):
    assert summary["steps"] == 3 and summary["learner_version"] == 3
    assert [s["step"] for s in summary["trained_steps"]] == [1, 2, 3]  # the whole run, each step once
    assert [a["resumed_from_step"] for a in summary["attempts"]] == [None, 1, 2]
    assert summary["accounting"]["balanced"] and summary["accounting"]["groups_trained"] == 3
    # each resumed attempt trained from its checkpoint's weights (versions 1, then 2) ...
    assert [s["learner_version"] for s in summary["trained_steps"]] == [0, 1, 2]
    # ... and went on with the data cursor: later sampler positions, no instance trained twice
    instances = [tuple(i) for s in summary["trained_steps"] for i in s["instances"]]
    assert [i[2] for i in instances] == sorted({i[2] for i in instances})
    assert len({(t, seed) for t, seed, _ in instances}) == len(instances) == 3
    steps_logged = [r["step"] for r in read_metrics(run_dir) if "policy_version" in r and "event" not in r]
    assert steps_logged == [1, 2, 3]
    trained_groups = {g for s in summary["trained_steps"] for g in s["group_ids"]}
    on_disk = {f.name[len("group-"):-len(".parquet")] for f in (run_dir / "trajectories").glob("group-*.parquet")}
    assert trained_groups <= on_disk
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the torn save was removed by a later one
