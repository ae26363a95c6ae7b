"""A pool of BrowserGym env server processes on 127.0.0.1: the embedded default next to a rollout
worker.

    with EnvServerPool(2, EnvConfig(task="miniwob.click-test")) as pool:
        client = BrowserGymEnvClient(pool.urls[0])
        ...
        pool.ensure_alive()        # restart any server that died (its URL changes)

Each server runs in its own session / process group (`start_new_session`), and its Playwright
driver and Chromium processes inherit that group, so stopping a server is one `killpg` that takes
its browsers with it. Every process a pool starts also carries the environment variable
`BGRPO_ENV_POOL_TAG=<tag>` (inherited by its browsers), so leftovers that left the group can still
be found (`find_tagged_processes`).

A pool's files live in one folder of its own, `<tmp>/bgrpo-env-pool-*`: the servers' logs and port
files, and (as the servers' TMPDIR) everything Playwright and Chromium put in a temporary folder,
such as the `playwright_chromiumdev_profile-*` browser profiles (megabytes each). `close()` removes
it; a pool whose owner was SIGKILLed cannot, so every new pool first removes the folders whose owner
(`owner.json`: PID and start time) is no longer running. Pools are closed on `close()`, on leaving the `with` block
(exceptions and Ctrl-C included), at interpreter exit (atexit) and on SIGTERM (converted to
SystemExit when nobody else handles it). A server whose parent dies shuts itself down.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Optional

import requests

from core.processes import make_owned_dir, remove_dead_owned_dirs
from envs.browsergym.config import EnvConfig

logger = logging.getLogger(__name__)

POOL_TAG_VAR = "BGRPO_ENV_POOL_TAG"
SERVER_TAG_VAR = "BGRPO_ENV_SERVER_TAG"
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
_live_pools: "weakref.WeakSet[EnvServerPool]" = weakref.WeakSet()
POOL_DIR_PREFIX = "bgrpo-env-pool-"


def remove_dead_pool_dirs(root: Optional[str] = None) -> list[Path]:
    """Removes the pool folders under `root` (the temporary folder) whose owner process is gone
    (killed before its `close()`); returns them."""
    return remove_dead_owned_dirs(POOL_DIR_PREFIX, root)


class EnvServerStartError(RuntimeError):
    """A server did not become healthy in time; the message includes the end of its log."""


def find_tagged_processes(var: str, value: str) -> list[int]:
    """PIDs of this user's processes whose environment contains `var=value` (Linux /proc)."""
    needle = f"{var}={value}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie is already dead; its parent reaps it
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry.name))
        except (OSError, IndexError):  # gone, or not ours
            continue
    return found


def kill_tagged_processes(var: str, value: str, timeout_s: float = 5.0) -> list[int]:
    """SIGKILL every process tagged `var=value` until none is left (or timeout); return the PIDs."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    own_group = os.getpgrp()
    while True:
        pids = find_tagged_processes(var, value)
        if not pids or time.monotonic() > deadline:
            return killed
        # Chromium's zygote and renderers drop the environment but stay in the browser's
        # process group: kill the groups of tagged processes too (never our own group).
        groups = set()
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except OSError:
                pass
        for group in groups - {own_group, 0, 1}:
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass
        _kill_pids(pids, signal.SIGKILL)
        killed.extend(p for p in pids if p not in killed)
        time.sleep(0.1)


def _kill_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


class _Server:
    """One server process and what is needed to stop and inspect it."""

    def __init__(self, process: subprocess.Popen, log_path: Path, port_file: Path, tag: str):
        self.process = process
        self.log_path = log_path
        self.port_file = port_file
        self.tag = tag
        self.url: Optional[str] = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class EnvServerPool:
    """N BrowserGym env server processes on free ports of `host`."""

    def __init__(
        self,
        num_servers: int,
        env_config: Optional[EnvConfig] = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 90.0,
        stop_timeout_s: float = 5.0,
        log_dir: Optional[str] = None,
        tag: Optional[str] = None,
    ):
        if num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {num_servers}")
        self.env_config = (env_config or EnvConfig()).validate()
        self.num_servers = num_servers
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.tag = tag or f"pool-{uuid.uuid4().hex[:12]}"
        for folder in remove_dead_pool_dirs():  # what a killed owner left (it could not close)
            logger.info("removed %s: its env pool's owner is gone", folder)
        self.work_dir = make_owned_dir(POOL_DIR_PREFIX)
        self.tmp_dir = self.work_dir / "tmp"
        """The servers' TMPDIR: Playwright's browser profiles land here, and go with the pool."""
        self.tmp_dir.mkdir()
        self.log_dir = Path(log_dir) if log_dir else self.work_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._servers: list[Optional[_Server]] = [None] * num_servers
        self._lock = threading.RLock()
        self._closed = False
        self._generation = 0
        _live_pools.add(self)
        _install_exit_handlers()
        try:
            for i in range(num_servers):  # start all, then wait: they boot in parallel
                self._servers[i] = self._spawn(i)
            for i in range(num_servers):
                self._wait_healthy(self._servers[i])
        except BaseException:
            self.close()
            raise

    # --- public API ---

    @property
    def urls(self) -> list[str]:
        """`http://host:port` of every server (a restarted server has a new URL)."""
        return [s.url for s in self._servers if s is not None and s.url]

    @property
    def pids(self) -> list[int]:
        """Server process ids (each also the id of its process group)."""
        return [s.process.pid for s in self._servers if s is not None]

    def is_alive(self, i: int) -> bool:
        """Whether server i's process runs and answers /health."""
        server = self._servers[i]
        if server is None or server.process.poll() is not None or not server.url:
            return False
        try:
            return requests.get(f"{server.url}/health", timeout=3.0).status_code == 200
        except requests.RequestException:
            return False

    def restart(self, i: int) -> str:
        """Stop server i (and its browsers) and start a fresh one; return its URL."""
        with self._lock:
            if self._closed:
                raise RuntimeError("pool is closed")
            old = self._servers[i]
            if old is not None:
                self._stop(old)
            logger.warning("env server %d restarting (old pid %s)", i, old.process.pid if old else None)
            self._servers[i] = self._spawn(i)
            self._wait_healthy(self._servers[i])
            return self._servers[i].url

    def ensure_alive(self) -> list[int]:
        """Restart every server that died or stopped answering; return their indices."""
        restarted = []
        for i in range(self.num_servers):
            if not self.is_alive(i):
                self.restart(i)
                restarted.append(i)
        return restarted

    def close(self) -> None:
        """Stop every server and its browsers. Idempotent; safe from atexit/signal handlers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            servers = [s for s in self._servers if s is not None]
            for server in servers:  # SIGTERM all first so they shut down in parallel
                self._signal_group(server, signal.SIGTERM)
                self._signal_group(server, signal.SIGCONT)
            for server in servers:
                self._stop(server)
            # Backstop: anything of ours that escaped its process group.
            leftovers = kill_tagged_processes(POOL_TAG_VAR, self.tag)
            if leftovers:
                logger.info("killed %d leftover processes of env pool %s", len(leftovers), self.tag)
            _live_pools.discard(self)
            # Logs, port files, browser profiles: nothing reads them once the servers are gone (a
            # start failure's message carries the log's tail).
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "EnvServerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- process management ---

    def _spawn(self, i: int) -> _Server:
        self._generation += 1
        name = f"server{i}-gen{self._generation}"
        port_file = self.log_dir / f"{name}.port"
        log_path = self.log_dir / f"{name}.log"
        config = replace(self.env_config)
        env = dict(os.environ)
        env[POOL_TAG_VAR] = self.tag
        env[SERVER_TAG_VAR] = f"{self.tag}/{name}"
        env["TMPDIR"] = str(self.tmp_dir)  # Playwright's profiles and Chromium's temporary files
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        command = [
            sys.executable,
            "-m",
            "envs.browsergym.server.app",
            "--host",
            self.host,
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--config-json",
            config.to_json(),
            "--parent-pid",
            str(os.getpid()),
        ]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=_PROJECT_ROOT,
                start_new_session=True,  # own process group: killpg reaches its browsers
            )
        return _Server(process, log_path, port_file, f"{self.tag}/{name}")

    def _wait_healthy(self, server: _Server) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise EnvServerStartError(
                    f"env server exited with code {server.process.returncode} while starting; log "
                    f"{server.log_path}:\n{server.log_tail()}"
                )
            if server.url is None and server.port_file.exists():
                server.url = f"http://{self.host}:{int(server.port_file.read_text().strip())}"
            if server.url is not None:
                try:
                    if requests.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.2)
        raise EnvServerStartError(
            f"env server pid {server.process.pid} not healthy after {self.startup_timeout_s:.0f} s; "
            f"log {server.log_path}:\n{server.log_tail()}"
        )

    @staticmethod
    def _signal_group(server: _Server, sig: int) -> None:
        try:
            os.killpg(server.process.pid, sig)
        except OSError:  # group already empty
            pass

    def _stop(self, server: _Server) -> None:
        # SIGTERM lets uvicorn close the sessions (and their browsers); the group SIGKILL that
        # follows takes whatever is left of the group (the Playwright driver, Chromium).
        self._signal_group(server, signal.SIGTERM)
        self._signal_group(server, signal.SIGCONT)  # a stopped (hung) server must see it
        try:
            server.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            logger.info("env server pid %d still running %.0f s after SIGTERM; killing it", server.process.pid, self.stop_timeout_s)
        self._signal_group(server, signal.SIGKILL)
        try:
            server.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            logger.error("env server pid %d survived SIGKILL", server.process.pid)
        # Playwright starts each browser in a new session (and Chromium's crash handler
        # daemonizes), so the group kill misses them: find them by the tag they inherited.
        kill_tagged_processes(SERVER_TAG_VAR, server.tag)


# --- process-wide cleanup ---

_handlers_installed = False


def _close_all_pools() -> None:
    for pool in list(_live_pools):
        try:
            pool.close()
        except Exception as e:
            logger.warning("closing env pool at exit failed: %s", e)


def _on_sigterm(signum, frame) -> None:
    # Unwind like Ctrl-C does, so `with` blocks, finally clauses and atexit close the pools.
    raise SystemExit(128 + signum)


def _install_exit_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_close_all_pools)
    # Only the main thread may set handlers, and only replace the default (never someone else's,
    # e.g. Ray's or pytest's).
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
