"""Checkpoints of a run: every learner rank saves its state with the driver's data cursor
(`cluster.accounting.Ledger.cursor`) under run_dir/checkpoints; `--resume` reads them back.

A save is atomic (learner/checkpoint.py: a temporary folder, fsync, rename, then the `latest`
pointer), so a driver killed mid-save leaves `latest` on the previous complete checkpoint. What the
killed attempt wrote after that checkpoint is superseded on resume (`supersede_after`): the resumed
run does those steps again, and the run folder must describe each step once.
"""

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


def last_cursor(run_dir: Path) -> dict[str, Any]:
    """The data cursor of the latest complete checkpoint (read before any actor starts)."""
    from learner.checkpoint import CheckpointError, read_cursor, resolve

    ckpt_root = run_dir / CHECKPOINTS
    try:
        return read_cursor(resolve(ckpt_root))
    except CheckpointError as e:
        raise TrainingError(f"--resume {run_dir}: no complete checkpoint in {ckpt_root} ({e})") from None


SUPERSEDED_DIR = "superseded"


def supersede_after(run_dir: Path, cursor: dict[str, Any]) -> dict[str, Any]:
    """Before a resume from `cursor`'s checkpoint: the metrics records of later steps are marked
    superseded (`cluster.metrics.mark_superseded`), and the training groups of task instances not
    settled (trained or dropped) at the checkpoint, which the resumed run plays again, move with
    their viewer pages to `trajectories/superseded/` and `viewer/superseded/`, out of the run's
    record and its index. Returns what it did (logged as the `resume` event)."""
    import os

    import pyarrow.parquet as pq

    from cluster.metrics import mark_superseded

    step = int(cursor["step"])
    settled = {(str(i[0]), int(i[1])) for i in cursor.get("trained_instances", []) + cursor.get("dropped_instances", [])}
    moved = []
    for f in sorted((run_dir / "trajectories").glob("group-*.parquet")):
        rows = pq.read_table(f, columns=["group_id", "task", "seed"]).to_pylist()
        if not rows or (rows[0]["task"], int(rows[0]["seed"])) in settled:
            continue
        for path in (f, run_dir / "viewer" / f"group-{rows[0]['group_id']}.html"):
            if path.exists():
                (path.parent / SUPERSEDED_DIR).mkdir(exist_ok=True)
                os.replace(path, path.parent / SUPERSEDED_DIR / path.name)
        moved.append(rows[0]["group_id"])
    return {"event": "resume", "from_step": step, "superseded_metrics_records": mark_superseded(run_dir, step),
            "superseded_groups": moved}


def load(learners: list[Any], run_dir: Path, root: str = CHECKPOINTS) -> dict[str, Any]:
    """Every rank loads the latest checkpoint under run_dir/root (`--resume`, and a learner
    recovered inside the run: cluster/learner_recovery.py); returns its data cursor."""
    import ray

    ckpt_root = run_dir / root
    if not (ckpt_root / "latest").exists():
        raise TrainingError(f"--resume {run_dir}: no checkpoint in {ckpt_root}")
    cursors = ray.get([lr.load_checkpoint.remote(str(ckpt_root)) for lr in learners], timeout=600)
    return cursors[0]
