"""Which process a PID names now: a PID is reused once its process is gone, so whatever stops a
recorded process (a run's `bgrpo cleanup`, an env pool's sweep of dead owners' folders) checks that
the PID still names the same process by its start time (Linux /proc). No role imports here."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None
    when no such process runs (a zombie counts as gone: it is dead, its parent reaps it)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[19])  # fields[0] is field 3 (state), so field 22 is fields[19]


def same_process(pid: int, started: int | None) -> bool:
    """Whether `pid` still names the process that had start time `started`."""
    return started is not None and start_time(pid) == started


def describe(pid: int) -> dict:
    """{pid, start, cmdline} of a running process (what a record of it keeps)."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    return {"pid": int(pid), "start": start_time(pid), "cmdline": cmdline[:300]}


def own_identity() -> dict:
    return describe(os.getpid())


OWNER_FILE = "owner.json"


def make_owned_dir(prefix: str) -> Path:
    """A new folder `<tmp>/<prefix>*` recording its owner (this process: PID and start time) in
    `owner.json`, so a later `remove_dead_owned_dirs(prefix)` can tell when a SIGKILLed owner
    left it behind."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / OWNER_FILE).write_text(json.dumps(own_identity()))
    return folder


def remove_dead_owned_dirs(prefix: str, root: str | None = None) -> list[Path]:
    """Removes the folders `<root or tmp>/<prefix>*` whose owner process is gone (killed before it
    could remove them); returns them. A folder without an owner record (being created, or made by
    an older version) is left alone."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
            if same_process(int(owner["pid"]), owner["start"]):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
