"""Temporary folders that outlive a SIGKILLed owner (core/processes.py): the env pool's folders and
the vLLM engines' IPC-socket folder are removed by the next start once their owner is gone, and
only then."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from actors.engines.config import RPC_DIR_PREFIX
from core.processes import OWNER_FILE, make_owned_dir, remove_dead_owned_dirs

PREFIX = "bgrpo-test-owned-"


def test_only_folders_of_dead_owners_are_removed(tmp_path):
    root = str(tmp_path)
    code = ("import sys, tempfile; tempfile.tempdir = sys.argv[1]; "
            "from core.processes import make_owned_dir; print(make_owned_dir(sys.argv[2]))")
    dead = Path(subprocess.run([sys.executable, "-c", code, root, PREFIX], capture_output=True, text=True,
                               check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}).stdout.strip())
    old_tempdir, tempfile.tempdir = tempfile.tempdir, root
    try:
        alive = make_owned_dir(PREFIX)
    finally:
        tempfile.tempdir = old_tempdir
    unowned = tmp_path / f"{PREFIX}unowned"
    unowned.mkdir()
    other = tmp_path / "bgrpo-other-prefix"
    other.mkdir()
    (other / OWNER_FILE).write_text((dead / OWNER_FILE).read_text())
    assert dead.parent == tmp_path and (dead / OWNER_FILE).exists()
    assert remove_dead_owned_dirs(PREFIX, root) == [dead]
    assert not dead.exists() and alive.exists() and unowned.exists() and other.exists()


def test_vllm_sockets_go_to_the_engines_own_folder(shared_vllm_vl_engine, request):
    shared_vllm_vl_engine.get()
    try:
        folder = Path(os.environ["VLLM_RPC_BASE_PATH"])
        assert folder.name.startswith(RPC_DIR_PREFIX) and (folder / OWNER_FILE).exists()
        sockets = [p for p in folder.iterdir() if stat.S_ISSOCK(p.stat().st_mode)]
        assert sockets, f"no vLLM IPC socket in {folder}: {sorted(p.name for p in folder.iterdir())}"
        assert folder not in remove_dead_owned_dirs(RPC_DIR_PREFIX)  # its owner (this process) is alive
        assert folder.exists()
    finally:
        shared_vllm_vl_engine.release(request)
