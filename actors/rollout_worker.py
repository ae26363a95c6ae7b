"""The rollout worker: one engine, K env sessions, GRPO groups of multi-step episodes.

A plain class (constructible in a unit test); the last line makes it a Ray actor. The driver calls
`run_group(task, seed, G)` and, between groups, `receive_weights(update)` (weightsync/).

Inside `run_group` the G episodes run on K session threads (one env client each); every step's
prompt goes through one `GenerationBatcher` (continuous batching: each engine call takes the prompts
waiting at that moment; a session still stepping or resetting its browser holds no one back).
Several `run_group` calls may run at once (the actor is threaded): the next group's episodes take
sessions as the current group's episodes free them, so its resets overlap the current group's end. An env server that dies or hangs fails its episode (status FAILED, with the
reason) and is replaced before the session is used again; the group is then re-run or dropped per
`RolloutConfig.on_failure`. Every episode started is counted exactly once as finished, truncated
or failed (`stats()`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ray

from actors.action_parser import ActionParser
from actors.config import RolloutConfig
from actors.env_servers import EnvServers, Slot
from actors.episode import (
    GenerationBatcher,
    is_env_failure,
    run_episode,
)
from core.group_meta import GroupMeta
from core.trajectory import FAILED, FINISHED, TRUNCATED, Trajectory, TrajectoryGroup, TrajectoryWriter, new_id
from weightsync import Receivers, WeightUpdate

log = logging.getLogger(__name__)


def group_failed(group: TrajectoryGroup) -> bool:
    """True when any episode of the group failed for infrastructure reasons: such a group
    (returned by `run_group` when it was dropped) must not be trained on."""
    return any(t.status == FAILED for t in group.trajectories)


class ClientEnvSession:
    """`EnvSession` over the OpenEnv WebSocket client of our BrowserGym env server."""

    def __init__(self, base_url: str, connect_timeout_s: float, message_timeout_s: float,
                 on_reset: Callable[[float], None] | None = None,
                 on_browser_recycle: Callable[[], None] | None = None, trust_unreported_seed: bool = False) -> None:
        from envs.browsergym.client import BrowserGymEnvClient

        self.base_url = base_url
        self.on_reset = on_reset  # told each successful reset's seconds
        self.on_browser_recycle = on_browser_recycle  # told when a reset recycled the server's browser
        self.client = BrowserGymEnvClient(
            base_url, connect_timeout_s=connect_timeout_s, message_timeout_s=message_timeout_s,
            trust_unreported_seed=trust_unreported_seed,
        )

    def reset(self, task: str, seed: int) -> Any:
        t0 = time.monotonic()
        observation = self.client.reset(seed=seed, task=task).observation
        if self.on_reset is not None:
            self.on_reset(time.monotonic() - t0)
        if self.on_browser_recycle is not None and getattr(observation, "browser_recycled", False):
            self.on_browser_recycle()
        return observation

    def step(self, action: str) -> tuple[Any, float, bool]:
        from envs.browsergym.models import BrowserGymAction

        result = self.client.step(BrowserGymAction(action_str=action))
        return result.observation, result.reward, result.done

    def close(self) -> None:
        try:
            self.client.close()
        except Exception as exc:  # noqa: BLE001 - closing a dead connection may fail; nothing to do
            log.debug("closing env client of %s: %s", self.base_url, exc)


def _is_timeout(exc: BaseException) -> bool:
    """Timeouts of any layer (asyncio, socket, websockets, our client) count as a hung server."""
    import asyncio

    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return True
    return "timeout" in type(exc).__name__.lower() or "timed out" in str(exc).lower()


_Slot = Slot  # one env session (actors/env_servers.py)


@dataclass
class RolloutStats:
    """Counters of one worker. Invariants (checked by `balanced`):
    episodes_started == finished + truncated + failed + in_flight;
    group_attempts == groups_completed + groups_dropped + groups_rerun + groups_in_flight."""

    episodes_started: int = 0
    episodes_finished: int = 0
    episodes_truncated: int = 0
    episodes_failed: int = 0
    episodes_in_flight: int = 0
    group_attempts: int = 0
    groups_completed: int = 0
    groups_dropped: int = 0
    groups_rerun: int = 0
    groups_in_flight: int = 0
    env_restarts: int = 0
    """Env servers restarted (embedded or on an env-server host; a host actor recreated by Ray
    counts once)."""
    env_failovers: int = 0
    """Sessions moved off a remote server found down to another server."""
    env_failures: int = 0
    """Episodes failed for their env server (each repaired: restart, fail-over or reconnect)."""
    parse_fallbacks: int = 0
    steps: int = 0
    engine_s: float = 0.0
    """Sum over steps of the time an episode waited for its action (batching included)."""
    env_s: float = 0.0
    """Sum over steps of env step round trips (browser + WebSocket transport)."""
    resets: int = 0
    reset_s: float = 0.0
    """Sum of env reset round trips."""
    browser_recycles: int = 0
    """Resets at which an env server relaunched its browser for age or memory (EnvConfig
    browser_max_episodes / browser_max_memory_mb)."""
    failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return (
            self.episodes_started
            == self.episodes_finished + self.episodes_truncated + self.episodes_failed + self.episodes_in_flight
            and self.group_attempts
            == self.groups_completed + self.groups_dropped + self.groups_rerun + self.groups_in_flight
        )


class RolloutWorker:
    """Runs GRPO groups of BrowserGym episodes with one engine and K env sessions."""

    def __init__(
        self,
        worker_id: str,
        rollout_config: RolloutConfig,
        engine_config: Any,
        env_config: Any,
        run_dir: str | os.PathLike,
        env_urls: Sequence[str] | None = None,
        env_url_tasks: Mapping[str, Sequence[str]] | None = None,
        trust_unreported_seed: bool = False,
        env_host: Any = None,
        env_failover_urls: Sequence[str] | None = None,
    ) -> None:
        """`env_url_tasks`: remote servers that serve only some tasks, {url: [qualified task]};
        each episode then runs on a session to a server of its task (unlisted URLs serve all).
        `env_host`: the env-server host actor behind `env_urls` (placement ray_actors), asked to
        restart a failed server. `env_failover_urls`: remote servers a session may fail over to
        when its own are down (actors/env_servers.py)."""
        rollout_config.validate()
        self._env_host = env_host
        self._failover_urls = list(env_failover_urls or [])
        self._url_tasks = {str(u): set(ts) for u, ts in (env_url_tasks or {}).items()}
        self._trust_unreported_seed = trust_unreported_seed
        self.worker_id = str(worker_id)
        self.config = rollout_config
        self.run_dir = Path(run_dir)
        self.parser = ActionParser(
            rollout_config.allowed_actions, rollout_config.max_action_chars,
            fallback_action=rollout_config.fallback_action,
        )
        self._stats = RolloutStats()
        self._lock = threading.Lock()  # guards _stats
        self._engine_lock = threading.Lock()  # generate vs update_weights
        self._engine_sleeps = 0
        self._env: EnvServers | None = None
        self.engine = None
        self._batcher: GenerationBatcher | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._started = time.monotonic()
        self._last_group_window: tuple[float, float] | None = None
        try:
            self._start_env_sessions(env_urls, env_config)
            self._start_engine(engine_config)
        except BaseException:
            self.close()
            raise

    def _start_env_sessions(self, env_urls: Sequence[str] | None, env_config: Any) -> None:
        """The env servers (an embedded pool by default, an env-server host's or remote URLs by
        configuration) and K session slots spread over them (sessions inside one server run one at
        a time)."""
        self._env = EnvServers(self.worker_id, self.config, env_config, env_urls, self._env_host, self._url_tasks,
                               self._failover_urls, self._count)
        self._slots = self._env.slots(self.config.num_sessions)
        self._free: queue.Queue[_Slot] = queue.Queue()
        for slot in self._slots:
            self._free.put(slot)

    def _start_engine(self, engine_config: Any) -> None:
        """The engine, the batcher in front of it, the episode threads and the Parquet writer."""
        from actors.engines import create_engine

        rollout_config = self.config
        self.engine = create_engine(engine_config)
        # Drained: weight loads take the engine lock (never mid-batch); an object-store fetch
        # does not. In flight: the engine applies an update between two of its steps itself
        # (actors/engines/update_gate.py), so the worker must not hold the batch's lock around it.
        self._in_flight = getattr(engine_config, "weight_update", "drained") == "in_flight"
        self._update_lock = None if self._in_flight else self._engine_lock
        self._receivers = Receivers(self.engine, self._update_lock)
        self._batcher = GenerationBatcher(
            self.engine, rollout_config.sampling, rollout_config.engine_timeout_s, self._engine_lock,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=rollout_config.num_sessions, thread_name_prefix=f"rollout-{self.worker_id}"
        )
        self._writer = TrajectoryWriter(self.run_dir / "trajectories") if rollout_config.write_parquet else None

    # --- the driver's API --------------------------------------------------------------------

    def run_group(self, task: str, seed: int, num_generations: int) -> TrajectoryGroup:
        """Runs G episodes of (task, seed) concurrently and returns them as one group.

        A group in which an episode failed (env died or hung, timeout) is re-run up to
        `max_group_reruns` times when `on_failure == "rerun"`; otherwise, or when the reruns are
        used up, it is dropped: returned with its failed episodes marked (see `group_failed`) and
        counted in `groups_dropped`. Every attempt is written to Parquet and the viewer. Raises
        `EnvServersGaveUp` when the env servers keep failing (rollout.env_restart_budget).
        """
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if self._env.fatal is not None:
            raise self._env.fatal
        reruns = 0
        started_at = time.time()
        while True:
            group = self._run_group_once(task, int(seed), int(num_generations))
            failed = group_failed(group)
            if self._env.fatal is not None:  # env servers keep dying: the run must stop, not retry
                with self._lock:
                    self._stats.groups_in_flight -= 1
                    self._stats.groups_dropped += 1
                self._record(group)
                raise self._env.fatal
            with self._lock:
                self._stats.groups_in_flight -= 1
                if not failed:
                    self._stats.groups_completed += 1
                elif self.config.on_failure == "rerun" and reruns < self.config.max_group_reruns:
                    self._stats.groups_rerun += 1
                else:
                    self._stats.groups_dropped += 1
            self._record(group)
            self._last_group_window = (started_at, time.time())
            if not failed:
                return group
            if self.config.on_failure == "rerun" and reruns < self.config.max_group_reruns:
                reruns += 1
                log.warning("worker %s: group %s (%s seed %s) had a failed episode; re-running (%d/%d)",
                            self.worker_id, group.group_id, task, seed, reruns, self.config.max_group_reruns)
                continue
            log.warning("worker %s: dropping group %s (%s seed %s): failed episodes",
                        self.worker_id, group.group_id, task, seed)
            return group

    @ray.method(num_returns=2)
    def run_group_by_ref(self, task: str, seed: int, num_generations: int) -> tuple[GroupMeta, TrajectoryGroup]:
        """`run_group` as two Ray objects: the small metadata the driver schedules on, and the
        group itself, which the driver only hands on by reference to the learner (its screenshots
        never pass through the driver). Two returns rather than a `ray.put` here: the caller owns
        both objects, so they outlive this worker."""
        group = self.run_group(task, seed, num_generations)
        return GroupMeta.of(group), group

    def update_weights(self, version: int, weights: Mapping[str, Any]) -> int:
        """Loads new weights into the engine (between batches, or in flight: between two engine
        steps) and returns the new version."""
        with self._update_lock or contextlib.nullcontext():
            self.engine.update_weights(version, weights)
            return self.engine.policy_version

    def connect_weight_sync(self, kind: str, init: Mapping[str, Any]) -> None:
        """Joins the learner's end of weight-sync strategy `kind` (weightsync/; NCCL forms its
        group here, once)."""
        self._receivers.connect(kind, init)

    def receive_weights(self, update: WeightUpdate) -> int:
        """Receives one version through the strategy the update names and loads it into the
        engine (between batches, or in flight between two engine steps); returns the new version."""
        return self._receivers.receive(update)

    def sleep_engine(self) -> None:
        """Frees the engine's GPU memory for a learner on the same GPU (colocated sync runs; the
        driver calls it only between collections, when no episode is running)."""
        with self._engine_lock:
            self.engine.sleep()
            self._engine_sleeps += 1

    def wake_engine(self) -> None:
        with self._engine_lock:
            self.engine.wake_up()

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def get_policy_version(self) -> int:
        """`policy_version` as a method (Ray actors expose methods, not properties)."""
        return self.engine.policy_version

    def env_urls(self) -> list[str]:
        """The env server URL of each session."""
        return [s.url for s in self._slots]

    def env_server_pids(self) -> list[int | None]:
        """PIDs of the embedded env server processes (None for remote servers)."""
        return self._env.pids() if self._env is not None else []

    def stats(self) -> dict[str, Any]:
        """Counters (they always balance), timings and the engine's batching figures."""
        with self._lock:
            s = self._stats
            out = {k: v for k, v in vars(s).items() if k != "failure_reasons"}
            out["failure_reasons"] = dict(s.failure_reasons)
            out["balanced"] = s.balanced
        b = self._batcher.stats if self._batcher else None
        out.update(
            worker_id=self.worker_id,
            policy_version=self.engine.policy_version if self.engine else -1,
            engine_calls=b.calls if b else 0,
            engine_requests=b.requests if b else 0,
            engine_busy_s=b.busy_s if b else 0.0,
            engine_max_batch=b.max_batch if b else 0,
            engine_sleeps=self._engine_sleeps,
            # weight_update_mode, weight_updates, weight_update_idle_s(_mean), ..._wait_s_mean,
            # weight_update_reprefill_tokens (actors/engines/update_gate.py)
            **(self.engine.weight_update_stats() if self.engine else {}),
            uptime_s=time.monotonic() - self._started,
            last_group_window=self._last_group_window,  # (start, end) wall-clock of the last run_group
        )
        return out

    def close(self) -> None:
        """Stops the sessions, the engine and the env servers this worker started."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        for slot in getattr(self, "_slots", []):
            if slot.session is not None:
                slot.session.close()
                slot.session = None
        if self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None
        if self._env is not None:
            self._env.close()

    def __enter__(self) -> "RolloutWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inside ------------------------------------------------------------------------------

    def _run_group_once(self, task: str, seed: int, num_generations: int) -> TrajectoryGroup:
        group_id = new_id()
        with self._lock:
            self._stats.group_attempts += 1
            self._stats.groups_in_flight += 1
        futures = [
            self._executor.submit(self._run_one_episode, task, seed, group_id) for _ in range(num_generations)
        ]
        trajectories = [f.result() for f in futures]
        return TrajectoryGroup(group_id, task, seed, trajectories)

    def _run_one_episode(self, task: str, seed: int, group_id: str) -> Trajectory:
        slot = self._free.get()
        episode_id = new_id()
        with self._lock:
            self._stats.episodes_started += 1
            self._stats.episodes_in_flight += 1
        try:
            traj = self._episode_on_slot(slot, task, seed, episode_id, group_id)
        except Exception as exc:  # noqa: BLE001 - an unexpected error still accounts the episode
            log.exception("worker %s: episode %s crashed", self.worker_id, episode_id)
            traj = Trajectory(episode_id, group_id, task, seed, status=FAILED, worker_id=self.worker_id,
                              failure_reason=f"worker_error: {type(exc).__name__}: {exc}")
        finally:
            self._free.put(slot)
        with self._lock:
            s = self._stats
            s.episodes_in_flight -= 1
            if traj.status == FINISHED:
                s.episodes_finished += 1
            elif traj.status == TRUNCATED:
                s.episodes_truncated += 1
            else:
                s.episodes_failed += 1
                kind = traj.failure_reason.split(":", 1)[0]
                s.failure_reasons[kind] = s.failure_reasons.get(kind, 0) + 1
            s.steps += len(traj.steps)
            s.parse_fallbacks += sum(st.parse_fallback for st in traj.steps)
            s.engine_s += sum(st.engine_s for st in traj.steps)
            s.env_s += sum(st.env_s for st in traj.steps)
        return traj

    def _episode_on_slot(self, slot: _Slot, task: str, seed: int, episode_id: str, group_id: str) -> Trajectory:
        cfg = self.config
        self._env.route(slot, self._slots, task)
        if slot.session is None:
            try:
                slot.session = ClientEnvSession(slot.url, cfg.connect_timeout_s, cfg.step_timeout_s,
                                                on_reset=self._count_reset,
                                                on_browser_recycle=self._count_browser_recycle,
                                                trust_unreported_seed=self._trust_unreported_seed)
            except Exception as exc:  # noqa: BLE001
                self._repair(slot, f"connect failed: {exc}")
                return Trajectory(episode_id, group_id, task, seed, status=FAILED, worker_id=self.worker_id,
                                  failure_reason=f"env_error: connect to {slot.url}: {type(exc).__name__}: {exc}")
        traj = run_episode(
            slot.session, self._batcher.generate, task=task, seed=seed, episode_id=episode_id,
            group_id=group_id, config=cfg, parser=self.parser, worker_id=self.worker_id,
            is_timeout=_is_timeout,
        )
        if is_env_failure(traj):
            self._repair(slot, traj.failure_reason)
        return traj

    def _count_reset(self, seconds: float) -> None:
        with self._lock:
            self._stats.resets += 1
            self._stats.reset_s += seconds

    def _count_browser_recycle(self) -> None:
        with self._lock:
            self._stats.browser_recycles += 1

    def _count(self, counter: str) -> None:
        """One env failure, restart or fail-over (`EnvServers` tells it)."""
        with self._lock:
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)

    def _repair(self, slot: _Slot, reason: str) -> None:
        """Drops the session's client and replaces its env server (restart, or fail-over for
        remote servers; actors/env_servers.py) so the next episode on this session starts on a
        healthy one."""
        self._env.repair(slot, reason)

    def _record(self, group: TrajectoryGroup) -> None:
        if self._writer is not None:
            self._writer.write(group)
        if self.config.write_viewer:
            from actors.viewer import write_group_html

            write_group_html(group, self.run_dir / "viewer")


# Resources (CPUs, GPUs) are decided by the driver through .options(); threaded so the driver can
# read stats() while a group runs.
RolloutWorkerActor = ray.remote(max_concurrency=4)(RolloutWorker)
