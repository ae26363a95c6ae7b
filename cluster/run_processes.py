"""The processes a run started on this machine, recorded in its run folder, and `bgrpo cleanup`.

    bgrpo cleanup RUN_DIR      stop what a killed run left running (also the first thing --resume does)

A driver killed with SIGKILL runs no `finally`: whatever it started that does not stop by itself
(the local Ray it started, Ray's workers, env servers, Chromium) is left to the next run. So:

- the driver puts a run tag in its environment (`BGRPO_RUN_TAG=<run>-<id>`) before it starts Ray:
  a local Ray it starts, Ray's workers (the raylet passes its environment on), their env servers and
  the browsers inherit it, so they can be found in /proc even when no PID was recorded;
- `processes.json` in the run folder records the driver and every tagged process (PID, start time,
  command line) after start-up and after each checkpoint, one entry per attempt (a resume adds one);
- `cleanup(run_dir)` refuses while a recorded driver still runs, then stops every recorded process
  whose PID still names the same process (same start time: a PID is reused once its process is
  gone), every process still carrying one of the run's tags, and the process groups such a process
  leads (Chromium's helpers leave the environment behind but stay in the browser's group), and
  removes the env-pool folders whose owner is gone. Never by name: nothing outside the run is touched.

When the driver joined an existing Ray cluster (`ray job submit`, a test's session cluster), the
actors do not inherit its environment; Ray stops a dead driver's actors itself, and their env
servers stop when their parent is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from cluster.accounting import TrainingError
from core.processes import describe, same_process, start_time

PROCESSES_FILE = "processes.json"
RUN_TAG_VAR = "BGRPO_RUN_TAG"


class RunStillRunning(TrainingError):
    """The run's driver is alive: its processes are not leftovers."""


def _read(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / PROCESSES_FILE).read_text())
    except (OSError, ValueError):
        return {"attempts": []}


def _write(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / PROCESSES_FILE
    tmp = path.with_name(f".{PROCESSES_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


class RunProcesses:
    """This attempt's entry in `processes.json`, and the run tag in this process's environment."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.tag = f"{self.run_dir.name}-{uuid.uuid4().hex[:8]}"
        self._previous_tag: str | None = None
        self._begun = False

    def begin(self) -> None:
        """Tags this process's environment (before Ray starts) and adds the attempt to the record."""
        self._previous_tag = os.environ.get(RUN_TAG_VAR)
        os.environ[RUN_TAG_VAR] = self.tag
        self._begun = True
        record = _read(self.run_dir)
        record["attempts"].append({"tag": self.tag, "driver": describe(os.getpid()), "processes": []})
        _write(self.run_dir, record)

    def snapshot(self) -> int:
        """Records every process of this machine that carries the run tag; returns how many."""
        from envs.browsergym.pool import find_tagged_processes

        found = [describe(pid) for pid in find_tagged_processes(RUN_TAG_VAR, self.tag)]
        record = _read(self.run_dir)
        for attempt in record["attempts"]:
            if attempt["tag"] == self.tag:
                known = {(p["pid"], p["start"]) for p in attempt["processes"]}
                attempt["processes"] += [p for p in found if p["start"] is not None and (p["pid"], p["start"]) not in known]
        _write(self.run_dir, record)
        return len(found)

    def end(self) -> None:
        """Takes the tag out of this process's environment again (a later run in it gets its own)."""
        if not self._begun:
            return
        self._begun = False
        if self._previous_tag is None:
            os.environ.pop(RUN_TAG_VAR, None)
        else:
            os.environ[RUN_TAG_VAR] = self._previous_tag


def cleanup(run_dir: str | os.PathLike, timeout_s: float = 15.0) -> list[dict[str, Any]]:
    """Stops what the run's earlier attempts left running (see the module docstring); returns the
    processes it stopped. Raises RunStillRunning while a recorded driver (not this process) runs."""
    from actors.engines.config import RPC_DIR_PREFIX
    from core.processes import remove_dead_owned_dirs
    from envs.browsergym.pool import remove_dead_pool_dirs

    record = _read(Path(run_dir))
    for attempt in record["attempts"]:
        driver = attempt["driver"]
        if driver["pid"] != os.getpid() and same_process(driver["pid"], driver["start"]):
            raise RunStillRunning(f"{run_dir}: its driver is still running (pid {driver['pid']}: "
                                  f"{driver['cmdline'][:120]}); stop it first (Ctrl-C or kill {driver['pid']})")
    stopped: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        alive = _leftovers(record)
        if not alive or time.monotonic() > deadline:
            break
        for p in alive:
            stopped.setdefault(p["pid"], p)
        _kill(alive)
        time.sleep(0.2)
    remove_dead_pool_dirs()
    remove_dead_owned_dirs(RPC_DIR_PREFIX)  # the killed engines' IPC sockets
    return list(stopped.values())


def _leftovers(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's processes still alive: recorded ones that are the same process, and tagged ones."""
    from envs.browsergym.pool import find_tagged_processes

    alive: dict[int, dict[str, Any]] = {}
    for attempt in record["attempts"]:
        for p in attempt["processes"]:
            if p["pid"] != os.getpid() and same_process(p["pid"], p["start"]):
                alive[p["pid"]] = p
        for pid in find_tagged_processes(RUN_TAG_VAR, attempt["tag"]):
            alive.setdefault(pid, describe(pid))
    return list(alive.values())


def _kill(processes: list[dict[str, Any]]) -> None:
    """SIGKILL to each process and to the process groups they lead (never this process's own group,
    never a group led by a process that is not the run's)."""
    own_group = os.getpgrp()
    for p in processes:
        pid = p["pid"]
        if start_time(pid) != p["start"]:
            continue  # gone meanwhile (its PID may name another process now)
        try:
            if os.getpgid(pid) == pid and pid != own_group:
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    """`bgrpo cleanup RUN_DIR`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: bgrpo cleanup RUN_DIR\n\nStops the processes a killed run left running (its local Ray, "
              "Ray workers, env servers, Chromium), found by the PIDs and the run tag recorded in "
              f"RUN_DIR/{PROCESSES_FILE}; refuses while the run's driver is alive.", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    run_dir = Path(argv[0])
    if not (run_dir / PROCESSES_FILE).is_file():
        print(f"bgrpo cleanup: no {PROCESSES_FILE} in {run_dir} (not a run folder, or a run of an older version)",
              file=sys.stderr)
        return 1
    try:
        stopped = cleanup(run_dir)
    except RunStillRunning as e:
        print(f"bgrpo cleanup: {e}", file=sys.stderr)
        return 1
    for p in stopped:
        print(f"stopped pid {p['pid']}: {p['cmdline'][:100]}")
    print(f"bgrpo cleanup: {len(stopped)} processes of {run_dir} stopped")
    return 0
