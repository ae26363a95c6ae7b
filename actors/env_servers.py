"""A rollout worker's env servers: where each session connects, and how a failed server is
replaced, for every placement (`cluster.env_placement`).

- embedded: an `EnvServerPool` of this worker (one server per session) on 127.0.0.1; a failed
  server is restarted (new port) by the pool;
- host: the servers of an env-server host actor (`cluster/env_hosts.py`, placement ray_actors);
  the worker asks the host to restart the server (`restart_server`). A host whose actor died
  (process killed, node lost) is restarted by Ray on a node with room (`max_restarts`), with
  fresh servers: the worker waits for it (`env_restart_timeout_s`) and takes its new URLs;
- remote: fixed URLs. A failed server is health-checked (`GET /health`); one that does not answer
  or hung is marked down and the session fails over to another server of the worker (or of the
  run: `failover_urls`) that serves the task; a down server is probed again after `RECHECK_S`.

Every episode that failed for its env server is counted (`env_failures`); every restart, host
recreation and fail-over too (`env_restarts`, `env_failovers`). Restarts and fail-overs are bounded:
more than `env_restart_budget` within `env_restart_window_s` (or a restart that cannot be done)
sets `fatal`, which the worker raises from `run_group` and the driver turns into the run's error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

RECHECK_S = 30.0
"""A remote server marked down is probed again (GET /health) after this many seconds."""


class EnvServersGaveUp(RuntimeError):
    """A worker's env servers keep failing (restart budget used up) or could not be restarted."""


@dataclass
class Slot:
    """One env session: which server it talks to (`server`: index into the worker's URLs) and its
    current client (None = connect before the next episode)."""

    index: int
    url: str
    server: int = 0
    session: Any = None


def healthy(url: str, timeout_s: float) -> bool:
    """Whether the server at `url` answers its health check."""
    import requests

    try:
        return requests.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


class EnvServers:
    """The env servers of one rollout worker and the repair of a failed one (module docstring)."""

    def __init__(self, worker_id: str, config: Any, env_config: Any, env_urls: Sequence[str] | None,
                 env_host: Any = None, url_tasks: Mapping[str, Sequence[str]] | None = None,
                 failover_urls: Sequence[str] | None = None,
                 count: Callable[[str], None] = lambda counter: None) -> None:
        self.worker_id = worker_id
        self.config = config
        self.count = count  # told "env_failures" / "env_restarts" / "env_failovers"
        self.url_tasks = {str(u): set(ts) for u, ts in (url_tasks or {}).items()}
        self.pool = None
        self.host = env_host
        if env_host is not None:
            import ray

            self.kind = "host"
            self.urls = [str(u) for u in (env_urls or ray.get(env_host.urls.remote(), timeout=config.env_restart_timeout_s))]
        elif env_urls:
            self.kind = "remote"
            self.urls = [str(u) for u in env_urls]
        else:
            from envs.browsergym.pool import EnvServerPool

            self.kind = "embedded"
            self.pool = EnvServerPool(num_servers=config.num_sessions, env_config=env_config)
            self.urls = list(self.pool.urls)
        self.spare = [str(u) for u in (failover_urls or []) if str(u) not in self.urls]
        self.down: dict[str, float] = {}
        """Remote URL -> when to probe it again."""
        self.lock = threading.Lock()  # one repair or re-route at a time
        self.charges: deque[float] = deque()
        self.fatal: EnvServersGaveUp | None = None

    def slots(self, n: int) -> list[Slot]:
        """n session slots spread over the servers (sessions inside one server run one at a time)."""
        return [Slot(i, self.urls[i % len(self.urls)], i % len(self.urls)) for i in range(n)]

    def pids(self) -> list[int | None]:
        """Server process ids of the embedded pool (None for servers elsewhere)."""
        return list(self.pool.pids) if self.pool is not None else [None] * len(self.urls)

    def close(self) -> None:
        if self.pool is not None:
            try:
                self.pool.close()
            finally:
                self.pool = None

    # --- routing (remote) ------------------------------------------------------------------------

    def route(self, slot: Slot, all_slots: Sequence[Slot], task: str) -> None:
        """Remote servers: points the slot at a live server that serves `task`: kept if its own
        does, else moved to the live serving server with the fewest of our sessions (the worker's
        own URLs first, then the fail-over ones). When none is live the slot stays and its episode
        fails (counted)."""
        if self.kind != "remote":
            return
        serving = [u for u in self.urls + self.spare if u not in self.url_tasks or task in self.url_tasks[u]]
        if not serving:
            raise ValueError(f"no env server serves task {task!r} (cluster.env_server_tasks: {self.url_tasks})")
        if slot.url in serving and self._up(slot.url):
            return
        live = [u for u in serving if self._up(u)]
        if not live:
            return
        with self.lock:
            load = {u: sum(s.url == u for s in all_slots) for u in live}
            own = [u for u in live if u in self.urls] or live
            new = min(own, key=lambda u: load[u])
            if slot.session is not None:
                slot.session.close()
                slot.session = None
            if slot.url in self.down:
                log.warning("worker %s: session %d fails over from %s to %s", self.worker_id, slot.index, slot.url, new)
                self.count("env_failovers")
            slot.url = new

    def _up(self, url: str) -> bool:
        """False while a down server waits for its next probe; a probe that answers clears it."""
        again = self.down.get(url)
        if again is None:
            return True
        if time.monotonic() < again:
            return False
        if healthy(url, min(self.config.connect_timeout_s, 5.0)):
            self.down.pop(url, None)
            return True
        self.down[url] = time.monotonic() + RECHECK_S
        return False

    # --- repair ------------------------------------------------------------------------------------

    def repair(self, slot: Slot, reason: str) -> None:
        """An episode on `slot` failed for its env server: drop the session, and restart the
        server (embedded, host) or mark it down so the session fails over (remote). Another
        session's repair that already replaced the same server is not repeated."""
        self.count("env_failures")
        with self.lock:
            if slot.session is not None:
                slot.session.close()
                slot.session = None
            if self.fatal is not None:
                return
            if self.kind == "remote":
                self._mark_down(slot.url, reason)
                return
            if slot.url != self.urls[slot.server]:  # already restarted by another session's repair
                slot.url = self.urls[slot.server]
                return
            try:
                restarted = self._restart(slot)
            except Exception as exc:  # noqa: BLE001 - counted; the next failure tries again
                log.warning("worker %s: restarting env server %d (%s) failed: %s", self.worker_id, slot.server, slot.url, exc)
                self._charge(slot.url, f"restart failed: {type(exc).__name__}: {exc}")
                return
            if restarted:
                self.count("env_restarts")
                self._charge(slot.url, reason)
            slot.url = self.urls[slot.server]

    def _restart(self, slot: Slot) -> bool:
        """Restarts slot's server; True if a server was replaced (self.urls updated)."""
        log.warning("worker %s: restarting env server %d (%s)", self.worker_id, slot.server, slot.url)
        if self.kind == "embedded":
            self.urls[slot.server] = self.pool.restart(slot.server)
            return True
        return self._restart_on_host(slot)

    def _restart_on_host(self, slot: Slot) -> bool:
        """The host restarts the server if it still has `slot.url` there; a host that died is
        waited for (Ray restarts it, with all servers new) and its URLs are taken."""
        import ray

        deadline = time.monotonic() + self.config.env_restart_timeout_s
        try:
            urls, restarted = ray.get(self.host.restart_server.remote(slot.server, slot.url),
                                      timeout=self.config.env_restart_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            log.warning("worker %s: env-server host died (%s); waiting for Ray to restart it", self.worker_id,
                        type(exc).__name__)
            urls, restarted = self._wait_for_host(deadline), True
        # Repairs are serialized and only this worker uses the host, so a server URL that changed
        # without a restart means Ray restarted the host meanwhile (a call to a restarting actor
        # waits for the new one): all its servers are new.
        restarted = restarted or [str(u) for u in urls] != self.urls
        self.urls = [str(u) for u in urls]
        return restarted

    def _wait_for_host(self, deadline: float) -> list[str]:
        import ray

        while True:
            try:
                return ray.get(self.host.urls.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"env-server host not back after {self.config.env_restart_timeout_s:g} s "
                                       f"(rollout.env_restart_timeout_s): {type(exc).__name__}: {exc}") from exc
                time.sleep(1.0)

    def _mark_down(self, url: str, reason: str) -> None:
        if url in self.down:  # another session found it down already
            return
        alive = healthy(url, min(self.config.connect_timeout_s, 5.0))
        if alive and "env_timeout" not in reason:
            log.warning("worker %s: remote env %s failed (%s) but answers; will reconnect", self.worker_id, url, reason)
            return
        log.warning("worker %s: remote env %s is down (%s); failing over", self.worker_id, url, reason)
        self.down[url] = time.monotonic() + RECHECK_S
        self._charge(url, reason)

    def _charge(self, url: str, reason: str) -> None:
        """One restart or fail-over against the budget; past it, `fatal` ends the run."""
        cfg = self.config
        now = time.monotonic()
        while self.charges and now - self.charges[0] > cfg.env_restart_window_s:
            self.charges.popleft()
        self.charges.append(now)
        if len(self.charges) > cfg.env_restart_budget:
            self.fatal = EnvServersGaveUp(
                f"rollout worker {self.worker_id}: env servers failed {len(self.charges)} times within "
                f"{cfg.env_restart_window_s:g} s (rollout.env_restart_budget {cfg.env_restart_budget}); "
                f"last: {url}: {reason}"[:2000])
            log.error("%s", self.fatal)
