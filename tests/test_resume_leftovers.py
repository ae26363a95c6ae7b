"""What a resumed run starts from and what a run leaves behind (issue 16 items 4 and 7), without Ray:
the configuration a `--resume` uses, the whole-run records of a resumed run, and the leftovers of
processes and temporary folders that a killed run leaves for the next start or `bgrpo cleanup`."""

from __future__ import annotations

import pytest

from cluster import config as C


def _run_folder(tmp_path, **overrides):
    run_dir = tmp_path / "run"
    cfg = C.build_config("local", {k: str(v) for k, v in overrides.items()}, environ={})
    C.save_config(cfg, run_dir / "config.yaml")
    return run_dir


def test_resume_uses_the_run_folders_config_not_the_preset(tmp_path):
    """`make run ARGS="--resume DIR"` runs `bgrpo train --config local --resume DIR`: the run's own
    total_steps (12) must win over the preset's, and the ignored --config is stated."""
    run_dir = _run_folder(tmp_path, **{"cluster.total_steps": 12, "learner.lr": 3e-5})
    cl = C.parse_cli(["--config", "local", "--resume", str(run_dir)], environ={})
    assert cl.config.cluster.total_steps == 12 and cl.config.learner.lr == 3e-5
    assert cl.config.cluster.run_dir == str(run_dir)
    assert any("--config local ignored" in n for n in cl.notes), cl.notes


def test_resume_states_every_field_an_override_changes(tmp_path):
    run_dir = _run_folder(tmp_path, **{"cluster.total_steps": 12})
    cl = C.parse_cli(["--resume", str(run_dir), "--cluster.total_steps", "20"], environ={"MAX_STEPS": "5"})
    assert cl.config.cluster.total_steps == 20 and cl.config.rollout.max_steps == 5
    changed = sorted(n.split()[1] for n in cl.notes)
    assert changed == ["cluster.total_steps", "rollout.max_steps"], cl.notes  # derived copies not repeated
    assert not C.parse_cli(["--resume", str(run_dir)], environ={}).notes  # nothing changed, nothing said


def test_bgrpo_train_prints_the_resume_notes(tmp_path, capsys):
    from cluster import driver

    run_dir = _run_folder(tmp_path, **{"cluster.total_steps": 12})
    assert driver.main(["--config", "local", "--resume", str(run_dir), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "total_steps: 12" in out.out
    assert "--config local ignored" in out.err


def _group_file(run_dir, gid, task, seed):
    from core.trajectory import Trajectory, TrajectoryGroup, TrajectoryWriter

    TrajectoryWriter(run_dir / "trajectories").write(
        TrajectoryGroup(gid, task, seed, [Trajectory(f"{gid}-e0", gid, task, seed, episode_return=1.0)]))
    (run_dir / "viewer").mkdir(exist_ok=True)
    (run_dir / "viewer" / f"group-{gid}.html").write_text("page")


def test_resume_marks_what_the_killed_attempt_did_after_the_checkpoint_superseded(tmp_path):
    """A run killed after its step-2 checkpoint had logged step 3 and played groups for it: the
    resumed run does step 3 again, so the old step-3 records are marked superseded (kept in the
    file, left out by readers) and its groups move out of trajectories/ and viewer/."""
    import json

    from cluster import checkpoints
    from cluster.metrics import read_metrics

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [{"step": 1, "policy_version": 1}, {"step": 2, "policy_version": 2}, {"step": 2, "event": "checkpoint"},
             {"step": 3, "policy_version": 3}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "tor')
    _group_file(run_dir, "trained1", "t", 11)     # trained at step 1
    _group_file(run_dir, "dropped2", "t", 12)     # dropped (failed) before the checkpoint
    _group_file(run_dir, "rerun2", "t", 12)       # a failed attempt of the same instance: part of the record
    _group_file(run_dir, "after3", "t", 13)       # played after the checkpoint: played again on resume
    cursor = {"step": 2, "trained_instances": [["t", 11, 0]], "dropped_instances": [["t", 12, 1, "failed_group"]]}

    done = checkpoints.supersede_after(run_dir, cursor)
    assert done["superseded_groups"] == ["after3"] and done["superseded_metrics_records"] == 1
    assert sorted(f.name for f in (run_dir / "trajectories").glob("*.parquet")) == [
        "group-dropped2.parquet", "group-rerun2.parquet", "group-trained1.parquet"]
    assert (run_dir / "trajectories" / "superseded" / "group-after3.parquet").is_file()
    assert (run_dir / "viewer" / "superseded" / "group-after3.html").is_file()
    assert [r["step"] for r in read_metrics(run_dir) if "policy_version" in r] == [1, 2]
    every = read_metrics(run_dir, superseded=True)
    assert [r["step"] for r in every] == [1, 2, 2, 3] and every[-1]["superseded"] is True
    # A second resume from the same checkpoint changes nothing more.
    assert checkpoints.supersede_after(run_dir, cursor)["superseded_metrics_records"] == 0


def test_books_of_a_resumed_run_add_up_over_its_attempts():
    from cluster.accounting import Accounting, merge_books, settled_books

    first = Accounting(started=30, trained=16, returned=24)
    first.dropped.update({"failed_group": 4, "rerun_attempt": 6})
    books = settled_books(first)  # at the checkpoint: only what was settled
    assert (books["started"], books["trained"], books["dropped"]) == (20, 16, {"failed_group": 4})
    second = Accounting(trained=8, returned=12)
    second.dropped.update({"run_ended": 4})
    second.finalize(worker_started=14)
    whole = merge_books([books, second.as_dict()])
    assert whole["started"] == 34 and whole["trained"] == 24 and whole["balanced"]
    assert whole["dropped"] == {"failed_group": 4, "run_ended": 4, "rerun_attempt": 2}


_DRIVER = """
import os, subprocess, sys, time
sys.path.insert(0, {root!r})
from cluster.run_processes import RunProcesses
run = RunProcesses({run_dir!r})
run.begin()  # the run tag, as the driver sets it before Ray starts
# A browser-like leader in its own session (as Playwright starts Chromium), tagged by inheritance, and
# a helper in its group that dropped the environment (as Chromium's zygote does).
leader = subprocess.Popen([sys.executable, "-c",
    "import os, subprocess, sys, time; env = dict(os.environ); env.pop('BGRPO_RUN_TAG');"
    "h = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], env=env);"
    "print(h.pid, flush=True); time.sleep(300)"], start_new_session=True, stdout=subprocess.PIPE, text=True)
helper = int(leader.stdout.readline())
run.snapshot()
print("READY", leader.pid, helper, flush=True)
time.sleep(300)
"""


def test_cleanup_stops_what_a_sigkilled_driver_left_and_only_that(tmp_path):
    """Real processes, no Ray: a driver records its run and starts a tagged process group, then is
    SIGKILLed; its group outlives it. `bgrpo cleanup` refuses while the driver runs, then stops the
    recorded/tagged leader and the untagged helper in its group, and leaves other processes alone."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from cluster.cli import main as bgrpo
    from cluster.run_processes import RunStillRunning, cleanup
    from core.processes import start_time

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    root = str(Path(__file__).resolve().parents[1])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER.format(root=root, run_dir=str(run_dir))],
                              stdout=subprocess.PIPE, text=True)
    leader = helper = 0
    try:
        ready = driver.stdout.readline().split()
        assert ready and ready[0] == "READY", ready
        leader, helper = int(ready[1]), int(ready[2])
        with pytest.raises(RunStillRunning, match="still running"):
            cleanup(run_dir)
        driver.kill()
        driver.wait(timeout=10)
        assert start_time(leader) and start_time(helper)  # a SIGKILLed driver leaves them running
        assert bgrpo(["cleanup", str(run_dir)]) == 0
        deadline = time.monotonic() + 10
        while (start_time(leader) or start_time(helper)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert start_time(leader) is None and start_time(helper) is None
        assert bystander.poll() is None  # not the run's: untouched
    finally:
        for pid in (leader, helper):
            if pid and start_time(pid):
                os.kill(pid, signal.SIGKILL)
        for p in (driver, bystander):
            p.kill()
            p.wait(timeout=10)


def test_bgrpo_help_lists_cleanup(capsys):
    from cluster.cli import main as bgrpo

    assert bgrpo(["--help"]) == 0  # a "95 %" in a command's help made argparse fail here
    assert "cleanup" in capsys.readouterr().out
    assert bgrpo(["cleanup", "--help"]) == 0
