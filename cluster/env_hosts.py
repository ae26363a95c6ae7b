"""Env servers as CPU-only Ray actors (cluster.env_placement = ray_actors).

On a cluster the browsers should scale with CPU nodes, not with GPUs: one vLLM engine can act for
hundreds of browsers, far more than its own node's cores can run. An `EnvServerHost` is a Ray actor
that owns an `EnvServerPool` (server processes + their Chromium) on whatever node Ray placed it,
bound to that node's IP so rollout workers on other nodes can reach it. The driver hands the URLs
to the rollout workers (`env_urls`), exactly as it would remote servers, together with the host's
handle: a worker whose episode failed on a server asks its host to restart it
(`restart_server`) and takes the new URL. The host is started with Ray actor restarts
(cluster/placement.py): a host whose process dies, or whose node is lost, is built again by Ray
(on a node with room, e.g. a new one), with fresh servers, and the workers take its new URLs.
"""

from __future__ import annotations

from typing import Any

import ray


class EnvServerHost:
    """N env server processes on this node, reachable from the other nodes."""

    def __init__(self, num_servers: int, env_config: Any, bind_host: str | None = None) -> None:
        from envs.browsergym.pool import EnvServerPool

        # 127.0.0.1 on one machine; the node IP when workers may live on other nodes.
        host = bind_host or ray.util.get_node_ip_address()
        self.pool = EnvServerPool(num_servers=num_servers, env_config=env_config, host=host)

    def urls(self) -> list[str]:
        return list(self.pool.urls)

    def pids(self) -> list[int]:
        return list(self.pool.pids)

    def node_id(self) -> str:
        """The Ray node this host runs on."""
        return ray.get_runtime_context().get_node_id()

    def restart_server(self, i: int, old_url: str) -> tuple[list[str], bool]:
        """Restarts server i unless it no longer has `old_url` (another session's repair already
        replaced it); returns every server's URL and whether a server was restarted."""
        if self.pool.urls[i] != old_url:
            return list(self.pool.urls), False
        self.pool.restart(i)
        return list(self.pool.urls), True

    def restart_all(self) -> list[str]:
        """Every server stopped and started afresh (a replaced rollout worker gets servers free of
        the sessions its dead predecessor left open); returns their URLs."""
        for i in range(self.pool.num_servers):
            self.pool.restart(i)
        return list(self.pool.urls)

    def ensure_alive(self) -> list[int]:
        """Restarts dead servers (their URLs change); returns their indices."""
        return self.pool.ensure_alive()

    def close(self) -> None:
        self.pool.close()


# Resources are the driver's decision (cluster/placement.py: CPU-only, SPREAD).
EnvServerHostActor = ray.remote(EnvServerHost)
