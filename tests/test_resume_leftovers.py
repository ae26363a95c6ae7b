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
