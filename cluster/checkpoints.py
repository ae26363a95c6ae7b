"""Checkpoints of a run: every learner rank saves its state with the driver's data cursor
(`cluster.accounting.Ledger.cursor`) under run_dir/checkpoints; `--resume` reads them back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.accounting import TrainingError

CHECKPOINTS = "checkpoints"


def save(learners: list[Any], run_dir: Path, cursor: dict[str, Any]) -> str:
    """Every rank saves (rank 0 writes the model and the cursor); returns the checkpoint's path."""
    import ray

    paths = ray.get([lr.save_checkpoint.remote(str(run_dir / CHECKPOINTS), cursor) for lr in learners], timeout=1800)
    return paths[0]


def load(learners: list[Any], run_dir: Path, root: str = CHECKPOINTS) -> dict[str, Any]:
    """Every rank loads the latest checkpoint under run_dir/root (`--resume`, and a learner
    recovered inside the run: cluster/learner_recovery.py); returns its data cursor."""
    import ray

    ckpt_root = run_dir / root
    if not (ckpt_root / "latest").exists():
        raise TrainingError(f"--resume {run_dir}: no checkpoint in {ckpt_root}")
    cursors = ray.get([lr.load_checkpoint.remote(str(ckpt_root)) for lr in learners], timeout=600)
    return cursors[0]
