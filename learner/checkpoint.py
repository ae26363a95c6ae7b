"""Atomic, resumable checkpoints.

Layout of a checkpoint root (the run folder's `checkpoints/`):

    latest                  name of the newest COMPLETE checkpoint (replaced atomically)
    step-000010/
        model/              Hugging Face folder: config, safetensors, tokenizer/processor files
                            (loadable by transformers `from_pretrained` and by vLLM)
        training_state.pt   optimizer, scheduler, RNG states, policy version, step, LoRA adapter
        cursor.json         the driver's data cursor (opaque dict), human readable
    .tmp-step-000012-ab12/  a save in progress (or killed mid-write: removed by the next save)

A save writes everything into a temporary folder, fsyncs every file and the folder, renames the
folder to its final name (atomic on one filesystem), fsyncs the root and only then moves the
`latest` pointer (write + fsync + rename). A crash at any point leaves `latest` naming the previous
complete checkpoint. Old checkpoints are deleted only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

LATEST = "latest"
TRAINING_STATE = "training_state.pt"
CURSOR = "cursor.json"
MODEL_DIR = "model"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up (so renames inside are durable too)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def save_atomically(
    root: str | os.PathLike, name: str, write: Callable[[Path], None], keep: int = 2
) -> Path:
    """Runs `write(tmp_dir)`, then publishes tmp_dir as `root/name` and points `latest` at it.

    Keeps the newest `keep` complete checkpoints (the new one included).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of saves that were killed mid-write: never complete, never pointed at.
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    tmp = root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    write(tmp)
    fsync_tree(tmp)
    _pause_for_tests(name)

    final = root / name
    if final.exists():  # re-saving the same step: move the old one aside first
        aside = root / f"{TMP_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(root)
    write_text_atomic(root / LATEST, name + "\n")

    complete = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    complete = [p for p in complete if (p / TRAINING_STATE).exists()]
    for old in complete[: max(0, len(complete) - keep)]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


WRITE_PAUSE_VAR = "BGRPO_TEST_CHECKPOINT_PAUSE"
"""`<name>:<seconds>`, e.g. `step-000002:60`: a test hook that pauses the save of that checkpoint
after its files are written and before it is published, so a test can kill the run mid-save."""


def _pause_for_tests(name: str) -> None:
    wanted, _, seconds = os.environ.get(WRITE_PAUSE_VAR, "").partition(":")
    if wanted == name:
        import time

        time.sleep(float(seconds or 60))


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a root whose `latest` names one -> the checkpoint folder."""
    path = Path(path)
    if (path / TRAINING_STATE).exists():
        return path
    latest = path / LATEST
    if latest.exists():
        target = path / latest.read_text().strip()
        if (target / TRAINING_STATE).exists():
            return target
        raise CheckpointError(f"{latest} names {target.name}, which is missing or incomplete")
    raise CheckpointError(f"no checkpoint at {path} (neither {TRAINING_STATE} nor {LATEST})")


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None when there is none yet."""
    try:
        return resolve(root)
    except CheckpointError:
        return None


def write_cursor(directory: Path, cursor: dict) -> None:
    (directory / CURSOR).write_text(json.dumps(cursor, indent=2, sort_keys=True, default=str))


def read_cursor(directory: Path) -> dict:
    p = directory / CURSOR
    return json.loads(p.read_text()) if p.exists() else {}


# Files of the source model folder that a complete HF folder needs besides config and weights.
_SKIP = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def copy_model_side_files(source: str | os.PathLike, target: Path) -> None:
    """Copies tokenizer, chat template, processor and generation configs from the source model
    folder, so the checkpoint's model folder loads on its own (vLLM needs them)."""
    source = Path(source)
    if not source.is_dir():
        return
    for f in source.iterdir():
        if not f.is_file() or f.name in _SKIP or f.name.startswith("model-"):
            continue
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            continue
        if not (target / f.name).exists():
            shutil.copy2(f, target / f.name)
