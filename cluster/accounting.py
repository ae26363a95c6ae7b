"""The books of a run, kept from group metadata only (`core.group_meta.GroupMeta`).

- `Accounting`: every episode a worker started is trained on or dropped with a counted reason;
- `Ledger`: what happens to each group the sampler handed out (received, dropped, lost with its
  worker, trained), the sampler's settle/record calls that go with it, the per-step records and
  the data cursor a checkpoint stores (and a resume reads back);
- `StepFigures`: the per-step metrics record (metrics.jsonl, Ray gauges, trackers).

No Ray here: the schedulers (cluster/scheduler.py) and their unit tests drive it directly.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from core.group_meta import GroupMeta


class TrainingError(RuntimeError):
    """The run cannot continue (too many actor failures, a broken invariant)."""


class LearnerLost(RuntimeError):
    """A learner rank died and the run cannot recover it in-process (restart budget used up, NCCL
    weight sync, or the restart itself failed): `bgrpo train` prints one line with the run folder
    and the `--resume` command (`cluster.driver._one_line_failure`)."""


@dataclass
class Accounting:
    """Episodes of this process's run: started (reported by the workers) = trained + dropped[reason]
    + in flight. Reasons:
    - rerun_attempt: episodes of group attempts a worker re-ran after an infrastructure failure;
    - failed_group: groups returned with failed episodes (reruns used up) are not trained;
    - stale: groups older than max_staleness when the learner would take them;
    - learner_filtered: dropped by the learner (failed episodes, groups below min_group_size,
      zero-variance groups when configured);
    - run_ended: groups that finished after the last learner step (async in-flight, sync spares);
    - worker_died: episodes of groups in flight on a worker whose actor died (its stats died with
      it): counted as started and dropped; the group itself is re-issued to the worker's
      replacement with the same task and seed;
    - learner_recovered: a learner rank died and the learner went back to the last checkpoint:
      groups trained after that checkpoint (their update is lost) and groups with a token sampled
      by a version newer than the checkpoint's (a policy the recovered learner never had).
    """

    started: int = 0
    trained: int = 0
    returned: int = 0
    """Episodes in groups returned to the driver by run_group."""
    dropped: Counter = field(default_factory=Counter)
    groups_trained: int = 0
    groups_dropped: Counter = field(default_factory=Counter)
    eval_episodes: int = 0
    retired_started: int = 0
    """Episodes started by workers that died (no longer in the live workers' stats)."""
    dropped_instances: list[tuple[str, int, int, str]] = field(default_factory=list)
    """(task, seed, sampler index, reason) of every dropped group, for the record of the run."""

    def drop(self, reason: str, meta: GroupMeta, index: int) -> None:
        self.dropped[reason] += meta.num_episodes
        self.groups_dropped[reason] += 1
        self.dropped_instances.append((meta.task, meta.seed, index, reason))

    def worker_retired(self, last_started: int, returned_by_it: int, lost_episodes: int) -> None:
        """A dead worker's episodes, which no live worker's stats report any more: those of its
        groups in flight (`lost_episodes`, started and dropped as worker_died) plus the rest it
        started, at least what it returned (its last known `episodes_started` may be older than
        its last group); the difference to what it returned stays a rerun_attempt drop."""
        self.dropped["worker_died"] += lost_episodes
        self.retired_started += max(last_started, returned_by_it + lost_episodes)

    def finalize(self, worker_started: int) -> None:
        """Closes the books once no group is in flight (`worker_started`: the live workers')."""
        self.started = worker_started + self.retired_started
        self.dropped["rerun_attempt"] = self.started - self.returned - self.dropped["worker_died"]

    @property
    def balanced(self) -> bool:
        return self.started == self.trained + sum(self.dropped.values()) and self.dropped["rerun_attempt"] >= 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "trained": self.trained,
            "returned": self.returned,
            "dropped": dict(self.dropped),
            "groups_trained": self.groups_trained,
            "groups_dropped": dict(self.groups_dropped),
            "eval_episodes": self.eval_episodes,
            "retired_started": self.retired_started,
            "balanced": self.balanced,
        }


def settled_books(acc: Accounting) -> dict[str, Any]:
    """The books of the episodes settled so far (trained, or dropped with a reason), as a checkpoint
    keeps them for the whole-run summary of a resumed run: episodes in flight and re-run attempts
    are not settled (the resumed run plays unsettled groups again), so started = trained + dropped."""
    dropped = {k: v for k, v in acc.dropped.items() if k != "rerun_attempt" and v}
    trained = acc.trained
    return {"started": trained + sum(dropped.values()), "trained": trained, "returned": acc.returned,
            "dropped": dropped, "groups_trained": acc.groups_trained, "groups_dropped": dict(acc.groups_dropped),
            "eval_episodes": acc.eval_episodes, "retired_started": acc.retired_started, "balanced": True}


def merge_books(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The whole run's books from each attempt's (`Accounting.as_dict` or `settled_books`)."""
    total: dict[str, Any] = {"dropped": Counter(), "groups_dropped": Counter()}
    for part in parts:
        for key, value in part.items():
            if key in ("dropped", "groups_dropped"):
                total[key].update(value)
            elif key == "balanced":
                total[key] = total.get(key, True) and bool(value)
            else:
                total[key] = total.get(key, 0) + value
    total["dropped"], total["groups_dropped"] = dict(total["dropped"]), dict(total["groups_dropped"])
    return total


@dataclass
class StepRecord:
    """What the learner trained at one step (kept for the run summary and the tests)."""

    step: int
    learner_version: int
    """Learner version when it trained (the new weights are learner_version + 1)."""
    group_ids: list[str]
    instances: list[tuple[str, int, int]]
    """(task, seed, sampler index) of each trained group."""
    min_token_version: int
    max_token_version: int
    episodes: int = 0
    """Episodes in the step's groups."""
    episodes_trained: int = 0
    """Of them, what the learner trained on (the rest: learner_filtered)."""


@dataclass(frozen=True)
class Finished:
    """A group a worker returned: its metadata, the reference to the group itself (handed to the
    learner, never fetched by the driver) and the sampler instance it was played for."""

    meta: GroupMeta
    ref: Any
    instance: Any
    """`cluster.sampler.TaskInstance` (task, seed, index)."""


class RestartBudget:
    """At most `budget` restarts within any `window_s` seconds (a sliding window)."""

    def __init__(self, budget: int, window_s: float, clock: Callable[[], float]) -> None:
        self.budget = budget
        self.window_s = window_s
        self.clock = clock
        self._times: deque[float] = deque()

    def take(self) -> bool:
        """One restart from the budget: False (nothing taken) when it is used up."""
        now = self.clock()
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.budget:
            return False
        self._times.append(now)
        return True

    def used(self) -> str:
        return f"{len(self._times)} of {self.budget} restarts within {self.window_s:g} s"


class Ledger:
    """The fate of every handed-out group, in the accounting and in the sampler (a settled
    instance is never re-issued on resume), plus the records a checkpoint's cursor keeps."""

    def __init__(self, sampler: Any, max_actor_failures: int,
                 log_event: Callable[[dict[str, Any]], None] = lambda record: None,
                 restart_budget: int = 0, restart_window_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic, max_failed_in_a_row: int = 0,
                 learner_restart_budget: int = 0, learner_restart_window_s: float = 3600.0) -> None:
        self.sampler = sampler
        self.max_failed_in_a_row = max_failed_in_a_row
        """Failed groups one after another before the run stops (0: no limit)."""
        self.failed_in_a_row = 0
        self.max_actor_failures = max_actor_failures
        self.log_event = log_event
        self.worker_restarts = 0
        self._worker_budget = RestartBudget(restart_budget, restart_window_s, clock)
        self.learner_restarts = 0
        self._learner_budget = RestartBudget(learner_restart_budget, learner_restart_window_s, clock)
        self.learner_recoveries: list[dict[str, Any]] = []
        """One record per learner recovery (the `learner_restart` event), for the summary."""
        self.accounting = Accounting()
        self.steps: list[StepRecord] = []
        self.actor_failures = 0
        self.trained_before: list[tuple] = []
        """(task, seed, index) trained before the checkpoint this run resumed from."""
        self.dropped_before: list[tuple] = []

    def receive(self, meta: GroupMeta, ref: Any, instance: Any) -> Finished | None:
        """A returned group: counted; None when it failed (dropped as failed_group)."""
        self.accounting.returned += meta.num_episodes
        mismatch = next((e.failure_reason for e in meta.episodes if "EnvEpisodeMismatchError" in e.failure_reason), "")
        if mismatch:  # a server that runs another task or seed than asked: a setup error, not bad luck
            raise TrainingError(f"an env server started the wrong episode: {mismatch}")
        finished = Finished(meta, ref, instance)
        if meta.failed:
            self.drop("failed_group", finished)
            self.failed_in_a_row += 1
            if self.max_failed_in_a_row and self.failed_in_a_row >= self.max_failed_in_a_row:
                reason = next((e.failure_reason for e in meta.episodes if e.failure_reason), "")
                raise TrainingError(
                    f"{self.failed_in_a_row} groups in a row failed (cluster.max_failed_groups_in_a_row); nothing "
                    f"is being trained. Last: {meta.task} seed {meta.seed}: {reason[:500]}")
            return None
        self.failed_in_a_row = 0
        return finished

    def drop(self, reason: str, finished: Finished) -> None:
        """A returned group that will not be trained: counted, and settled in the sampler (a resume
        does not re-issue it)."""
        self.accounting.drop(reason, finished.meta, finished.instance.index)
        self.sampler.settle(finished.instance.index)

    def lost(self, instance: Any, error: BaseException) -> None:
        """A run_group call that failed with its worker: the group is lost, a counted drop of its
        instance; too many failures end the run."""
        self.actor_failures += 1
        self.accounting.dropped_instances.append((instance.task, instance.seed, instance.index, "actor_failure"))
        self.sampler.settle(instance.index)
        self.log_event({"event": "actor_failure", "error": str(error)[:500], "actor_failures": 1.0})
        if self.actor_failures > self.max_actor_failures:
            raise TrainingError(f"{self.actor_failures} rollout-worker failures; last: {error}") from error

    def allow_restart(self, worker: str, error: BaseException) -> None:
        """A worker's actor died: one restart is taken from the budget (`restart_budget` per
        `restart_window_s`), or the run ends naming the worker and its last error."""
        if not self._worker_budget.take():
            raise TrainingError(
                f"rollout worker {worker} died and the restart budget is used up ({self._worker_budget.used()}, "
                f"cluster.worker_restart_budget / worker_restart_window_s); last error: {error}") from error

    def allow_learner_restart(self, error: BaseException) -> None:
        """A learner rank died: one learner restart is taken from its budget
        (`learner_restart_budget` per `learner_restart_window_s`), or LearnerLost."""
        if not self._learner_budget.take():
            raise LearnerLost(
                f"{error}; the learner restart budget is used up ({self._learner_budget.used()}, "
                "cluster.learner_restart_budget / learner_restart_window_s)") from error

    def learner_recovered(self, error: BaseException, checkpoint_step: int, details: dict[str, Any]) -> list[int]:
        """The learner went back to `checkpoint_step`: the steps trained after it are undone (their
        update died with the learner): their groups leave the trained books and are dropped as
        learner_recovered (the sampler does not re-issue them: the run goes on with new
        instances). Counted and logged; returns the steps undone."""
        undone = [r for r in self.steps if r.step > checkpoint_step]
        self.steps = [r for r in self.steps if r.step <= checkpoint_step]
        acc = self.accounting
        for r in undone:
            acc.trained -= r.episodes_trained
            acc.dropped["learner_filtered"] -= r.episodes - r.episodes_trained
            acc.dropped["learner_recovered"] += r.episodes
            acc.groups_trained -= len(r.instances)
            acc.groups_dropped["learner_recovered"] += len(r.instances)
            acc.dropped_instances.extend((t, s, i, "learner_recovered") for t, s, i in r.instances)
        self.learner_restarts += 1
        record = {"event": "learner_restart", "error": str(error)[:500], "checkpoint_step": checkpoint_step,
                  "steps_undone": [r.step for r in undone], **details,
                  "learner_restarts_total": float(self.learner_restarts)}
        self.learner_recoveries.append(record)
        self.log_event(record)
        return [r.step for r in undone]

    def worker_replaced(self, worker: str, error: BaseException, retired: dict[str, Any],
                        lost_instances: Sequence[Any], group_size: int) -> None:
        """A dead worker was replaced: counted, its episodes kept in the books (`retired`: its last
        known stats and what it returned, see `RayRollouts.restart`), its groups in flight
        (`lost_instances`, re-issued by the caller) counted as worker_died episodes."""
        self.worker_restarts += 1
        self.accounting.worker_retired(int(retired.get("episodes_started", 0)), int(retired.get("episodes_returned", 0)),
                                       len(lost_instances) * group_size)
        self.log_event({"event": "worker_restart", "worker": worker, "error": str(error)[:500],
                        "reissued": [[i.task, i.seed, i.index] for i in lost_instances],
                        "worker_restarts_total": float(self.worker_restarts)})

    def lost_at_end(self, instance: Any) -> None:
        """A group in flight at the end whose worker died: its episodes are in its stats."""
        self.accounting.dropped_instances.append((instance.task, instance.seed, instance.index, "actor_failure"))

    def trained(self, step: int, batch: Sequence[Finished], learner_metrics: dict[str, Any],
                version_before: int) -> StepRecord:
        metas = [f.meta for f in batch]
        used = int(learner_metrics.get("episodes", sum(len(m.trainable_episodes) for m in metas)))
        episodes = sum(m.num_episodes for m in metas)
        self.accounting.trained += used
        self.accounting.dropped["learner_filtered"] += episodes - used
        self.accounting.groups_trained += len(batch)
        versions = [v for m in metas for v in m.trainable_versions]
        record = StepRecord(
            step=step,
            learner_version=version_before,
            group_ids=[m.group_id for m in metas],
            instances=[(f.meta.task, f.meta.seed, f.instance.index) for f in batch],
            min_token_version=min(versions) if versions else -1,
            max_token_version=max(versions) if versions else -1,
            episodes=episodes,
            episodes_trained=used,
        )
        self.steps.append(record)
        for f in batch:
            self.sampler.record(f.meta.task, [e.success for e in f.meta.trainable_episodes])
            self.sampler.settle(f.instance.index)
        return record

    def cursor(self, step: int, version: int) -> dict[str, Any]:
        """The data cursor a checkpoint stores next to the learner state."""
        return {
            "sampler": self.sampler.state_dict(),
            "step": step,
            "policy_version": version,
            "trained_instances": [list(i) for r in self.steps for i in r.instances] + [list(i) for i in self.trained_before],
            "dropped_instances": [list(i) for i in self.dropped_before + self.accounting.dropped_instances],
            # Handed out, not yet trained or dropped (async: in flight or buffered): re-issued on --resume.
            "unsettled_instances": [[i.task, i.seed, i.index] for i in self.sampler.unsettled()],
        }

    def resume(self, cursor: dict[str, Any]) -> int:
        """Restores the sampler and the records from a checkpoint's cursor; returns its step."""
        self.sampler.load_state_dict(cursor["sampler"])
        self.trained_before = [tuple(x) for x in cursor.get("trained_instances", [])]
        self.dropped_before = [tuple(x) for x in cursor.get("dropped_instances", [])]
        return int(cursor["step"])


WORKER_COUNTERS = ("episodes_started", "episodes_finished", "episodes_truncated", "episodes_failed", "steps",
                   "env_restarts", "env_failovers", "env_failures", "engine_calls", "engine_sleeps", "browser_recycles",
                   "weight_updates", "weight_update_idle_s", "weight_update_reprefill_tokens")


class StepFigures:
    """The metrics record of each learner step, from the batch's metadata, the learner's metrics
    and the workers' cumulative counters (differenced against the previous step)."""

    def __init__(self) -> None:
        self._prev: dict[str, float] = {}

    def _delta(self, worker_stats: Sequence[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
        totals = {k: float(sum(s.get(k, 0) for s in worker_stats)) for k in WORKER_COUNTERS}
        delta = {k: v - self._prev.get(k, 0.0) for k, v in totals.items()}
        self._prev = totals
        return totals, delta

    def record(self, done: Any, version: int, worker_stats: Sequence[dict[str, Any]], trained_total: int,
               wall: float, learner_busy_s: float) -> dict[str, Any]:
        """`done`: a `cluster.scheduler.StepDone`; `wall`: seconds since the run started."""
        from cluster.metrics import per_task_figures

        metas = [f.meta for f in done.batch]
        trainable = [e for m in metas for e in m.trainable_episodes]
        lags = [done.version_before - v for e in trainable for v in e.policy_versions]
        totals, delta = self._delta(worker_stats)
        lm = done.learner_metrics
        tokens = float(lm.get("tokens", 0.0))
        n = len(trainable)
        record = {
            "policy_version": version,
            "episodes_started": delta["episodes_started"],
            "episodes_finished": delta["episodes_finished"] + delta["episodes_truncated"],
            "episodes_failed": delta["episodes_failed"],
            "episodes_trained": float(lm.get("episodes", n)),
            "episodes_dropped": 0.0,
            "env_steps": delta["steps"],
            "env_failures": delta["env_failures"],  # episodes failed for their env server
            "env_restarts": delta["env_restarts"],  # env servers restarted (or their host recreated)
            "env_failovers": delta["env_failovers"],  # remote sessions moved off a server found down
            "actor_failures": 0.0,
            "engine_sleeps": delta["engine_sleeps"],  # cluster.colocate: engines put to sleep this step
            "browser_recycles": delta["browser_recycles"],  # env.browser_max_episodes / _memory_mb relaunches
            # Engine time lost to weight updates this step, all workers (engine.weight_update:
            # drained or in_flight; actors/engines/update_gate.py defines idle time).
            "engine_update_idle_s": delta["weight_update_idle_s"],
            "engine_update_idle_s_per_update": (delta["weight_update_idle_s"] / delta["weight_updates"]
                                                if delta["weight_updates"] else 0.0),
            "engine_reprefill_tokens": delta["weight_update_reprefill_tokens"],
            "groups_trained": float(len(metas)),
            "trained_tokens": tokens,
            "success_rate": (sum(e.success for e in trainable) / n) if n else 0.0,
            "reward_mean": (sum(e.episode_return for e in trainable) / n) if n else 0.0,
            "policy_lag_max": float(max(lags)) if lags else 0.0,
            "policy_lag_mean": (sum(lags) / len(lags)) if lags else 0.0,
            "tokens_per_s": tokens / done.step_wall_s if done.step_wall_s > 0 else 0.0,
            "samples_per_s": trained_total / wall if wall > 0 else 0.0,
            "env_steps_per_s": totals["steps"] / wall if wall > 0 else 0.0,
            "learner_idle_frac": max(0.0, 1.0 - learner_busy_s / wall) if wall > 0 else 0.0,
            "learner_step_s": done.train_s,
            "weight_sync_s": done.sync_s,
            "collect_s": done.collect_s,
            "wall_s": wall,
            "tasks": sorted({m.task for m in metas}),
            **done.extra,
        }
        record.update({f"learner/{k}": v for k, v in lm.items()})
        record.update(per_task_figures(metas))  # task/<task>/success_rate, reward_mean: per-task gauges
        return record
