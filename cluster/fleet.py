"""The actors of one run: Ray start-up, placement, learner ranks, env-server hosts, rollout
workers, the evaluation worker, the weight-sync wiring between them, and their shutdown.

- `Fleet`: builds and stops the actors (`start`, `close`); no training logic;
- `WeightSyncWiring`: every weight transfer learner -> workers (object store or NCCL), through
  `connect` (once), `send` / `wait` (one version to every worker) and `publish` (the evaluation
  worker's copy). One delimited place, so a weight-sync package can replace it whole;
- `RayRollouts`: `cluster.scheduler.Rollouts` over the fleet (groups by reference); a learner
  rank's death in its calls is raised as `LearnerDied`, and `restart_learner` rebuilds the learner
  group at its last checkpoint (`restart_learner_group`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.accounting import LearnerLost, TrainingError
from cluster.models import resolve_model
from cluster.runenv import offline_env_vars
from cluster.scheduler import GroupLost, LearnerDied, LearnerRestored, WorkerDied
from core.group_meta import GroupMeta

log = logging.getLogger("bgrpo.driver")


def drop_none(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


class Fleet:
    """Owns the actors of one run. `start()` builds them; `close()` stops them (safe twice)."""

    def __init__(self, config: Any, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.owns_ray = False
        self.model_path = ""
        self.placement: Any = None
        self.learners: list[Any] = []
        self.workers: list[Any] = []
        self.env_hosts: list[Any] = []
        self.eval_worker: Any = None
        self.engine_cfg: Any = None
        self.env_urls: list[list[str] | None] = []
        self.env_routing: dict[str, Any] = {}
        self.single_node = True
        """One alive Ray node: env-server hosts bind loopback only."""
        self.last_stats: dict[int, dict[str, Any]] = {}
        """Each worker's last stats read (a dead worker's books come from here)."""
        self.retired_stats: list[dict[str, Any]] = []
        """Last known stats of workers that died and were replaced (their counters stay counted)."""

    def start(self) -> None:
        """Placement groups, learner ranks, env-server hosts, rollout workers (after `init_ray`);
        returns when every actor has been constructed (construction errors surface here)."""
        import ray

        self.model_path = resolve_model(self.config.model)
        self.place()
        self.start_learners()
        self.env_urls, self.env_routing = self.start_env_servers()
        self.start_workers()
        ray.get([w.get_policy_version.remote() for w in self.workers], timeout=600)
        ray.get([lr.get_policy_version.remote() for lr in self.learners], timeout=600)

    def init_ray(self) -> None:
        """A fresh local cluster, or the one we were submitted to."""
        import ray

        cfg = self.config
        if not ray.is_initialized():
            address = cfg.cluster.address or ("auto" if os.environ.get("RAY_ADDRESS") else "local")
            kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
            if address == "local":
                if cfg.cluster.num_cpus:
                    kwargs["num_cpus"] = cfg.cluster.num_cpus
                kwargs["runtime_env"] = {"env_vars": offline_env_vars()}
            ray.init(**kwargs)
            self.owns_ray = True
        log.info("Ray: %s", ray.cluster_resources())

    def place(self) -> None:
        """Placement groups; the evaluation worker (greedy, its own engine) needs what a rollout
        worker needs."""
        from cluster.placement import Placement

        cfg = self.config
        eval_on = bool(cfg.eval.every_steps or cfg.eval.at_end)
        eval_env_cpus = cfg.cluster.env_server_num_cpus if eval_on and cfg.cluster.env_placement == "ray_actors" else 0.0
        self.placement = Placement.create(cfg.cluster, eval_gpus=cfg.cluster.rollout_num_gpus if eval_on else 0.0,
                                          eval_cpus=eval_env_cpus)

    def start_learners(self) -> None:
        import ray

        from learner.learner import LearnerActor

        learner_cfg = copy.deepcopy(self.config.learner)
        learner_cfg.model_path = self.model_path
        world = self.config.cluster.learner_num_ranks
        self.learners = [
            LearnerActor.options(**drop_none(self.placement.learner_options(rank))).remote(learner_cfg, rank, world)
            for rank in range(world)
        ]
        if world > 1:
            addr, port = ray.get(self.learners[0].rendezvous_address.remote(), timeout=120)
            ray.get([lr.connect.remote(addr, port) for lr in self.learners], timeout=learner_cfg.dist_timeout_s)

    def restart_learners(self) -> None:
        """Every learner rank is replaced by a new actor at the same placement bundle (a group
        of ranks cannot go on with one rank replaced: the survivors' process group and optimizer
        steps are tied to the dead one). Returns once every new rank is constructed."""
        import ray

        for lr in self.learners:
            try:
                ray.kill(lr, no_restart=True)  # the dead one stays dead; the survivors free their bundles
            except Exception:  # noqa: BLE001
                pass
        self.start_learners()
        ray.get([lr.get_policy_version.remote() for lr in self.learners], timeout=600)

    def learner_death(self, error: BaseException, timeout: float = 10.0) -> LearnerDied | None:
        """`LearnerDied` naming the first dead learner rank when one is dead, else None. Probes every
        rank; a live rank busy in a collective with a dead one does not answer within `timeout`
        and is not waited for."""
        import ray

        refs = [lr.get_policy_version.remote() for lr in self.learners]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for rank, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError:
                    return LearnerDied(rank, error)
        return None

    def start_env_servers(self) -> tuple[list[list[str] | None], dict[str, Any]]:
        """Env servers as CPU-only actors (cluster), the configured remote ones, else embedded in
        each worker (None). Returns (urls per worker, the workers' routing options)."""
        import ray

        cfg = self.config
        env_urls: list[list[str] | None] = [None] * cfg.cluster.num_rollout_workers
        if cfg.cluster.env_placement == "ray_actors":
            from cluster.env_hosts import EnvServerHostActor

            # One node: loopback only. Several: the host node's IP, so other nodes' workers reach it.
            self.single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
            self.env_hosts = [
                EnvServerHostActor.options(**self.placement.env_host_options()).remote(
                    cfg.cluster.env_servers_per_worker, cfg.env, "127.0.0.1" if self.single_node else None
                )
                for _ in range(cfg.cluster.num_rollout_workers)
            ]
            env_urls = ray.get([h.urls.remote() for h in self.env_hosts], timeout=300)
        if cfg.cluster.env_placement == "remote":
            from cluster.placement import remote_env_servers

            env_urls, url_tasks = remote_env_servers(cfg.cluster)
            # Every configured server is a fail-over target of every worker (its own come first).
            return env_urls, {"env_url_tasks": url_tasks, "trust_unreported_seed": cfg.cluster.env_server_trust_seed,
                              "env_failover_urls": list(cfg.cluster.env_server_urls)}
        return env_urls, {}

    def start_workers(self) -> None:
        """Rollout workers, each: one engine + its env sessions."""
        from actors.rollout_worker import RolloutWorkerActor

        cfg = self.config
        self.engine_cfg = copy.deepcopy(cfg.engine)
        self.engine_cfg.model = self.model_path
        self.workers = [self.new_worker(i) for i in range(cfg.cluster.num_rollout_workers)]

    def new_worker(self, i: int) -> Any:
        """Rollout worker i as built at start-up: same name, placement bundle, engine and env
        servers (a restart builds the same one again). With env-server hosts it gets its host's
        handle, to have a failed server restarted there."""
        from actors.rollout_worker import RolloutWorkerActor

        cfg = self.config
        host = self.env_hosts[i] if cfg.cluster.env_placement == "ray_actors" else None
        return RolloutWorkerActor.options(**self.placement.rollout_options(i)).remote(
            f"w{i}", cfg.rollout, self.engine_cfg, cfg.env, str(self.run_dir), self.env_urls[i], **self.env_routing,
            env_host=host,
        )

    def restart_worker(self, i: int) -> dict[str, Any]:
        """Replaces dead worker i with a new actor at the same placement (its bundle is free once
        the old process is gone) and waits until it is constructed; returns the dead one's last
        known stats, which stay counted (`retired_stats`)."""
        import ray

        try:
            ray.kill(self.workers[i], no_restart=True)  # already dead: makes sure it never comes back
        except Exception:  # noqa: BLE001
            pass
        retired = dict(self.last_stats.pop(i, {}))
        self.retired_stats.append(retired)
        self.reclaim_env_sessions(i)
        self.workers[i] = self.new_worker(i)
        ray.get(self.workers[i].get_policy_version.remote(), timeout=600)
        return retired

    def reclaim_env_sessions(self, i: int) -> None:
        """Env-server hosts: worker i's servers are restarted before its replacement starts, so the
        sessions its dead predecessor left open (a lost node never closes its connections) do not
        fill them up (`env.max_sessions`). A host that cannot do it now is left to the new worker's
        repairs (its first episodes fail, counted, and the server is restarted then)."""
        import ray

        if self.config.cluster.env_placement != "ray_actors":
            return
        try:
            self.env_urls[i] = ray.get(self.env_hosts[i].restart_all.remote(), timeout=self.config.rollout.env_restart_timeout_s)
        except Exception as e:  # noqa: BLE001
            log.warning("env servers of w%d not restarted for its replacement: %s", i, e)

    def start_eval_worker(self, rollout: Any) -> Any:
        """The evaluation worker (built once): its own GPU share when engines use GPUs (a vLLM
        engine needs a visible GPU; counted in the resource check at start-up), writing under
        run_dir/eval so its trajectories never mix with training data."""
        from actors.rollout_worker import RolloutWorkerActor

        if self.eval_worker is None:
            urls = self.eval_env_urls()
            host = self.env_hosts[-1] if self.config.cluster.env_placement == "ray_actors" else None
            self.eval_worker = RolloutWorkerActor.options(num_cpus=0, num_gpus=self.config.cluster.rollout_num_gpus).remote(
                "eval", rollout, self.engine_cfg, self.config.env, str(self.run_dir / "eval"), urls,
                **self.env_routing, env_host=host,
            )
        return self.eval_worker

    def eval_env_urls(self) -> list[str] | None:
        """The evaluation worker's env servers: capacity of its own, never a session on the training
        workers' servers. In the qwen3-vl-2b-miniwob layout every session those servers accept is
        taken (rollout.num_sessions = env_servers_per_worker x env.max_sessions), so sharing them got
        every evaluation session refused. Embedded: None, the eval worker starts its own server.
        Ray actors: one more env-server host, for evaluation only (its CPU is counted at start-up).
        Remote: the configured servers, which need a session of headroom for evaluation; when they
        have none the evaluation is reported as failed (`cluster.eval.metrics_record`)."""
        import ray

        cfg = self.config
        if cfg.cluster.env_placement == "embedded":
            return None
        if cfg.cluster.env_placement == "ray_actors":
            from cluster.env_hosts import EnvServerHostActor

            host = EnvServerHostActor.options(**self.placement.env_host_options(num_servers=1)).remote(
                1, cfg.env, "127.0.0.1" if self.single_node else None
            )
            self.env_hosts.append(host)
            return ray.get(host.urls.remote(), timeout=300)
        return list(cfg.cluster.env_server_urls)

    def worker_stats(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Every live worker's stats; a worker that died (not yet replaced: the scheduler learns it
        from its group) reports its last known stats."""
        import ray

        refs = [w.stats.remote() for w in self.workers]
        try:
            stats = ray.get(refs, timeout=timeout)
        except ray.exceptions.RayActorError:
            stats = []
            for i, ref in enumerate(refs):
                try:
                    stats.append(ray.get(ref, timeout=timeout))
                except ray.exceptions.RayActorError:
                    stats.append({**self.last_stats.get(i, {}), "dead": True})
        self.last_stats.update(enumerate(stats))
        return stats

    def learner_version(self, timeout: float = 600) -> int:
        import ray

        return ray.get(self.learners[0].get_policy_version.remote(), timeout=timeout)

    def close(self) -> None:
        """Stops every actor (workers close their engines, env servers and browsers), removes the
        placement groups and, if this process started Ray, shuts Ray down. Safe to call twice."""
        try:
            import ray
        except ImportError:
            return
        if ray.is_initialized():
            actors = [a for a in [*self.workers, self.eval_worker, *self.env_hosts, *self.learners] if a is not None]
            _close_actors(ray, actors, self.config.cluster.shutdown_timeout_s)
            if self.placement is not None:
                self.placement.remove()
        self.workers, self.learners, self.env_hosts, self.eval_worker, self.placement = [], [], [], None, None
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
            self.owns_ray = False


def _close_actors(ray: Any, actors: list[Any], timeout: float) -> None:
    refs = []
    for a in actors:
        try:
            refs.append(a.close.remote())
        except Exception:  # noqa: BLE001 - a dead actor has nothing to close
            pass
    if refs:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        except Exception as e:  # noqa: BLE001
            log.warning("closing actors: %s", e)
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001
            pass


# --- weight sync ------------------------------------------------------------------------------------


class WeightSyncWiring:
    """The run's weight sync (`weightsync.make_weight_sync`, strategy `cluster.weight_sync`)
    over the fleet: learner rank 0 sends, every rollout worker receives. Built before the fleet
    starts; `connect()` makes the strategy once the actors exist (NCCL forms its group there)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.config = fleet.config
        self.sync_impl: Any = None
        """The `weightsync.WeightSync` of this run, after `connect()`."""
        self.outstanding: list[Any] = []
        """Sends not yet waited for (a worker replaced meanwhile is taken out of them)."""
        self.highest_sent = 0
        """The newest version ever sent to an engine: a recovered learner publishes above it."""

    def connect(self) -> None:
        from weightsync import make_weight_sync

        cluster = self.config.cluster
        self.sync_impl = make_weight_sync(cluster.weight_sync, self.fleet.learners[0], self.fleet.workers,
                                          timeout_s=cluster.weight_sync_timeout_s,
                                          bucket_mb=cluster.weight_sync_bucket_mb)
        self.sync_impl.setup()

    def reconnect(self) -> None:
        """The learner group was rebuilt: later syncs come from the new rank 0; sends in flight
        from the dead one are not waited for (their object died with its owner)."""
        self.outstanding.clear()
        self.connect()

    def sync(self) -> int:
        """Sends the learner's current version and waits until every worker loaded it."""
        version = self.sync_impl.sync()
        self.highest_sent = max(self.highest_sent, version)
        return version

    def send(self) -> Any:
        """Starts a sync without waiting; the returned `Pending` has the `.version` sent."""
        pending = self.sync_impl.send()
        self.highest_sent = max(self.highest_sent, pending.version)
        self.outstanding.append(pending)
        return pending

    def wait(self, pending: Any) -> None:
        """Waits for `send`'s sync everywhere (the learner's error first; versions checked). A
        worker that died meanwhile is not waited for: the scheduler learns of its death from its
        group and its replacement loads the current version (`replace_worker`)."""
        import ray

        try:
            self.sync_impl.wait(pending)
        except ray.exceptions.RayActorError:
            if pending is None:
                raise
            for i, ref in enumerate(pending.receiver_refs):
                try:
                    if ref is not None:
                        ray.get(ref, timeout=self.sync_impl.rpc_timeout_s)
                except ray.exceptions.RayActorError:
                    log.warning("rollout worker w%d died during a weight sync", i)
                    pending.receiver_refs[i] = None
            self.sync_impl.wait(pending)  # the live ones (and the learner: its death still raises)
        if pending in self.outstanding:
            self.outstanding.remove(pending)

    def replace_worker(self, i: int, worker: Any) -> int:
        """Worker i was replaced by `worker`: later syncs go to it, it loads the learner's current
        version now (before it samples), and sends still in flight no longer wait for the dead
        one (the new one has a version at least as new). Returns the version it loaded."""
        for pending in self.outstanding:
            pending.receiver_refs[i] = None
        return self.sync_impl.replace_receiver(i, worker)

    def load_into(self, workers: list[Any]) -> int:
        """The learner's current version into workers outside the sync group (the evaluation
        worker); returns that version."""
        version = self.sync_impl.load_into(workers)
        self.highest_sent = max(self.highest_sent, version)
        return version


class RayRollouts:
    """`cluster.scheduler.Rollouts` over the fleet. A group is two Ray objects (the worker's
    `run_group_by_ref`): the metadata, fetched here, and the group, whose ref goes to the
    learner ranks, which fetch it themselves (`train_step_refs`)."""

    def __init__(self, fleet: Fleet, weights: WeightSyncWiring, group_timeout_s: float) -> None:
        self.fleet = fleet
        self.weights = weights
        self.group_timeout_s = group_timeout_s
        self.num_workers = len(fleet.workers)
        self._group_refs: dict[Any, Any] = {}
        """metadata ref -> group ref, for the groups in flight."""
        self._worker_of: dict[Any, int] = {}
        self.returned_by = [0] * self.num_workers
        """Episodes of each worker's collected groups (a dead worker's books, `restart`)."""
        self._train_refs: dict[Any, list[Any]] = {}
        """rank 0's ref -> every rank's ref, for the step in flight."""

    def dispatch(self, worker: int, task: str, seed: int, group_size: int) -> Any:
        meta_ref, group_ref = self.fleet.workers[worker].run_group_by_ref.remote(task, seed, group_size)
        self._group_refs[meta_ref] = group_ref
        self._worker_of[meta_ref] = worker
        return meta_ref

    def wait_any(self, handles: list[Any]) -> Any:
        """A training step is waited for on every rank's ref: a rank that dies ends the wait at
        once (its survivors may sit in a collective until learner.dist_timeout_s)."""
        import ray

        other_ranks = {r: h for h in handles if h in self._train_refs for r in self._train_refs[h][1:]}
        done, _ = ray.wait(list(handles) + list(other_ranks), num_returns=1)
        return other_ranks.get(done[0], done[0])

    def collect(self, handle: Any) -> tuple[GroupMeta, Any]:
        import ray

        group_ref = self._group_refs.pop(handle)
        worker = self._worker_of.pop(handle)
        try:
            meta = ray.get(handle, timeout=self.group_timeout_s)
        except ray.exceptions.RayActorError as e:  # the actor is gone (ActorDiedError), not a failed group
            raise WorkerDied(str(e)) from e
        except ray.exceptions.RayTaskError as e:
            from actors.env_servers import EnvServersGaveUp

            if isinstance(e.cause, EnvServersGaveUp):  # env servers keep dying: retrying cannot help
                raise TrainingError(str(e.cause)) from e
            raise GroupLost(str(e)) from e
        except (ray.exceptions.RayError, TimeoutError) as e:
            raise GroupLost(str(e)) from e
        self.returned_by[worker] += meta.num_episodes
        return meta, group_ref

    def forget(self, handle: Any) -> None:
        self._group_refs.pop(handle, None)
        self._worker_of.pop(handle, None)

    def restart(self, worker: int, error: BaseException) -> dict[str, Any]:
        """A new actor for dead worker `worker` (`Fleet.restart_worker`), given the current
        weights and version before the scheduler re-issues its groups. NCCL weight sync is
        refused: the replacement would have to join the NCCL group, which means re-forming it with
        every worker (not done); the run ends with a TrainingError naming the worker."""
        if self.fleet.config.cluster.weight_sync != "object_store":
            raise TrainingError(
                f"rollout worker w{worker} died ({error}); restarting a worker needs cluster.weight_sync "
                f"object_store (with {self.fleet.config.cluster.weight_sync} the weight-sync group would have "
                "to be re-formed)") from error
        log.warning("rollout worker w%d died (%s): restarting it", worker, error)
        try:
            retired = self.fleet.restart_worker(worker)
            version = self.weights.replace_worker(worker, self.fleet.workers[worker])
        except Exception as e:  # noqa: BLE001 - one clear error with the first cause
            raise TrainingError(f"rollout worker w{worker} died ({error}) and could not be restarted: {e}") from e
        log.warning("rollout worker w%d restarted at version %d", worker, version)
        retired["episodes_returned"] = self.returned_by[worker]
        self.returned_by[worker] = 0
        return retired

    def start_train(self, refs: list[Any]) -> Any:
        # Every rank gets the same list of refs and fetches the groups from the object store.
        train_refs = [lr.train_step_refs.remote(refs) for lr in self.fleet.learners]
        self._train_refs[train_refs[0]] = train_refs
        return train_refs[0]

    def train_result(self, handle: Any) -> dict[str, Any]:
        """Rank 0's metrics once every rank is done; LearnerDied as soon as any rank's actor is
        gone, also when a survivor's error (its collective lost the dead peer) comes first; a
        step that raised with every rank alive still raises its error."""
        import ray

        refs = self._train_refs.pop(handle)
        pending, deadline = list(refs), time.monotonic() + 3600
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                return ray.get(refs, timeout=0)[0]  # raises GetTimeoutError
            try:
                ray.get(ready[0], timeout=0)
            except ray.exceptions.RayActorError as e:
                raise LearnerDied(refs.index(ready[0]), e) from e
            except ray.exceptions.RayError as e:
                died = self.fleet.learner_death(e) if len(refs) > 1 else None
                if died is None:
                    raise
                raise died from e
        return ray.get(refs[0], timeout=0)

    def send_weights(self) -> Any:
        import ray

        try:
            return self.weights.send()
        except ray.exceptions.RayActorError as e:  # rank 0 publishes: only its death lands here
            raise LearnerDied(0, e) from e

    def wait_weights(self, send: Any) -> None:
        """A worker's death is handled inside (`WeightSyncWiring.wait`); an error while a learner
        rank is dead (the send's object died with its owner) is that death."""
        import ray

        try:
            self.weights.wait(send)
        except ray.exceptions.RayError as e:
            died = self.fleet.learner_death(e)
            if died is None:
                raise
            raise died from e

    def restart_learner(self, error: BaseException) -> LearnerRestored:
        from cluster.learner_recovery import restart_learner_group

        self._train_refs.clear()  # the dead group's steps: never collected
        return restart_learner_group(self.fleet, self.weights, error)

    def sleep_engines(self) -> None:
        import ray

        ray.get([w.sleep_engine.remote() for w in self.fleet.workers], timeout=600)

    def wake_engines(self) -> None:
        import ray

        ray.get([w.wake_engine.remote() for w in self.fleet.workers], timeout=600)

    def engine_calls(self) -> float:
        stats = self.fleet.worker_stats() + self.fleet.retired_stats
        return float(sum(s.get("engine_calls", 0) for s in stats))
