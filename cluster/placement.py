"""Every resource decision of a run: placement groups, bundles, per-actor CPU/GPU options.

Two placement groups:
- learner: one bundle per rank ({CPU, GPU}), STRICT_PACK when the ranks use GPUs (NCCL over
  NVLink on one node), PACK otherwise;
- rollout: one bundle per rollout worker ({CPU, GPU for its engine}), strategy from the config
  (PACK on one machine, SPREAD over GPU nodes on a cluster).
With `cluster.colocate` there is one group instead: bundle i holds learner rank i and rollout
worker i together ({CPU and GPU of both}), so the two share one GPU.
Env-server hosts (env_placement = ray_actors) are CPU-only actors outside the groups, scheduled
with Ray's SPREAD strategy, so browsers land on whichever nodes have CPUs (and the custom resources
of `cluster.env_host_resources`, to pin them to browser nodes). Ray restarts a host that died, on
any node that has room (`max_restarts`); the workers bound how often (rollout.env_restart_budget).

Actors never pick their own resources: the driver asks this module for `.options(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig


class PlacementError(RuntimeError):
    """The cluster cannot provide the requested resources (in time)."""


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    b = {"CPU": float(cpus)}
    if gpus > 0:
        b["GPU"] = float(gpus)
    return b


@dataclass
class Placement:
    config: ClusterConfig
    learner_pg: PlacementGroup
    rollout_pg: PlacementGroup

    @classmethod
    def create(cls, config: ClusterConfig, timeout_s: float = 120.0, eval_gpus: float = 0.0,
               eval_cpus: float = 0.0) -> "Placement":
        """Reserves both groups; PlacementError (with what is missing) if not ready in time.
        `eval_gpus`, `eval_cpus`: what the evaluation worker and its env server will ask for later,
        outside the groups."""
        check_resources(config, eval_gpus, eval_cpus)
        if config.colocate:
            shared = placement_group(
                [_bundle(config.learner_num_cpus + config.rollout_num_cpus,
                         config.learner_num_gpus + config.rollout_num_gpus)] * config.learner_num_ranks,
                strategy=config.placement_strategy,
                name="bgrpo-colocated",
            )
            placement = cls(config, shared, shared)
            placement._wait(timeout_s)
            return placement
        learner_strategy = "STRICT_PACK" if config.learner_num_gpus > 0 else "PACK"
        learner_pg = placement_group(
            [_bundle(config.learner_num_cpus, config.learner_num_gpus)] * config.learner_num_ranks,
            strategy=learner_strategy,
            name="bgrpo-learner",
        )
        rollout_pg = placement_group(
            [_bundle(config.rollout_num_cpus, config.rollout_num_gpus)] * config.num_rollout_workers,
            strategy=config.placement_strategy,
            name="bgrpo-rollout",
        )
        placement = cls(config, learner_pg, rollout_pg)
        placement._wait(timeout_s)
        return placement

    def _groups(self) -> list[PlacementGroup]:
        """The distinct groups (one when colocated: learner and rollout share it)."""
        return list({id(pg): pg for pg in (self.learner_pg, self.rollout_pg)}.values())

    def _wait(self, timeout_s: float) -> None:
        config = self.config
        groups = self._groups()
        try:
            ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=timeout_s)
            if len(ready) != len(groups):
                raise PlacementError(
                    f"placement groups not ready after {timeout_s:.0f} s: the cluster lacks the resources "
                    f"for {config.learner_num_ranks} learner rank(s) x {_bundle(config.learner_num_cpus, config.learner_num_gpus)} "
                    f"+ {config.num_rollout_workers} rollout worker(s) x {_bundle(config.rollout_num_cpus, config.rollout_num_gpus)} "
                    f"(strategy {config.placement_strategy}); available: {ray.available_resources()}"
                )
        except BaseException:
            self.remove()
            raise

    def learner_options(self, rank: int) -> dict[str, Any]:
        return {
            "num_cpus": self.config.learner_num_cpus,
            "num_gpus": self.config.learner_num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.learner_pg, placement_group_bundle_index=rank
            ),
            "name": None,
        }

    def rollout_options(self, index: int) -> dict[str, Any]:
        return {
            "num_cpus": self.config.rollout_num_cpus,
            "num_gpus": self.config.rollout_num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.rollout_pg, placement_group_bundle_index=index
            ),
        }

    def env_host_options(self, num_servers: int | None = None) -> dict[str, Any]:
        """CPU-only, spread over the nodes (outside the GPU placement groups), restarted by Ray
        when it dies (its rollout workers count and bound that); `num_servers` defaults to a rollout
        worker's `env_servers_per_worker`."""
        servers = self.config.env_servers_per_worker if num_servers is None else num_servers
        options: dict[str, Any] = {
            "num_cpus": self.config.env_server_num_cpus * servers,
            "num_gpus": 0,
            "scheduling_strategy": "SPREAD",
            "max_restarts": -1,
        }
        if self.config.env_host_resources:
            options["resources"] = {k: float(v) for k, v in self.config.env_host_resources.items()}
        return options

    def remove(self) -> None:
        for pg in self._groups():
            try:
                remove_placement_group(pg)
            except Exception:  # already gone (cluster shut down): nothing left to free
                pass


def check_resources(config: ClusterConfig, eval_gpus: float = 0.0, eval_cpus: float = 0.0) -> None:
    """Fails fast (before waiting) when the whole cluster cannot ever hold the request."""
    total = ray.cluster_resources()
    need_cpu = config.learner_num_ranks * config.learner_num_cpus + config.num_rollout_workers * config.rollout_num_cpus
    need_cpu += eval_cpus
    if config.env_placement == "ray_actors":
        need_cpu += config.num_rollout_workers * config.env_servers_per_worker * config.env_server_num_cpus
    need_gpu = config.learner_num_ranks * config.learner_num_gpus + config.num_rollout_workers * config.rollout_num_gpus
    if need_gpu + eval_gpus > total.get("GPU", 0):
        raise PlacementError(
            f"the run needs {need_gpu + eval_gpus:g} GPUs (learner {config.learner_num_ranks} x {config.learner_num_gpus:g}, "
            f"rollout {config.num_rollout_workers} x {config.rollout_num_gpus:g}, evaluation worker {eval_gpus:g}) "
            f"but the cluster has {total.get('GPU', 0):g}; lower cluster.*_num_gpus (0 = CPU) or turn "
            "evaluation off (eval.every_steps 0, eval.at_end false)"
        )
    if config.env_placement == "ray_actors":
        hosts = config.num_rollout_workers + (1 if eval_cpus else 0)
        for name, amount in config.env_host_resources.items():
            if hosts * amount > total.get(name, 0):
                raise PlacementError(
                    f"the env-server hosts need {hosts * amount:g} of resource {name!r} "
                    f"(cluster.env_host_resources, {hosts} hosts) but the cluster has {total.get(name, 0):g}; "
                    f"start browser nodes with `ray start --resources '{{\"{name}\": N}}'`")
    if need_cpu > total.get("CPU", 0):
        raise PlacementError(
            f"the run needs {need_cpu:g} CPUs but the cluster has {total.get('CPU', 0):g}; lower "
            "cluster.*_num_cpus or raise cluster.num_cpus (logical CPUs of a local cluster)"
        )


def remote_env_servers(config: ClusterConfig) -> tuple[list[list[str]], dict[str, list[str]] | None]:
    """env_placement remote: each rollout worker's server URLs, and which tasks each URL serves
    (None: every URL serves every task). Without a task map the URLs are dealt round-robin; with
    one, every worker gets every URL, so it can reach a server of whatever task it is given, and
    picks per episode among those that serve it (actors/rollout_worker.py)."""
    from cluster.config import normalize_task

    urls, n = list(config.env_server_urls), config.num_rollout_workers
    if not config.env_server_tasks:
        return [urls[i::n] or urls for i in range(n)], None
    url_tasks = {u: [normalize_task(t) for t in ts] for u, ts in config.env_server_tasks.items()}
    return [list(urls) for _ in range(n)], url_tasks

