"""The two training loops, as plain code over a small interface (`Rollouts`).

- sync (`SyncScheduler`): collect `groups_per_step` groups with policy v (one group per worker
  at a time), train, send v+1 and wait until every worker loaded it before sampling again;
- async (`AsyncScheduler`): every worker always has a group in flight; finished groups enter a
  buffer; the learner trains whenever the buffer holds a batch of groups whose oldest token is at
  most `max_staleness` versions behind (older ones are dropped and counted), and new weights go
  to the workers while they keep sampling.

Both loops survive a learner rank's death (`LearnerDied`, raised by the `Rollouts` calls that
reach the learner): `Loop.recover_learner` takes a restart from the budget, has the learner group
rebuilt at its last checkpoint (`Rollouts.restart_learner`), undoes the steps trained after it and
sorts the groups on hand into re-trained and dropped (learner_recovered), then the loop goes on
from the checkpoint's step.

The schedulers see group metadata and opaque references only (`cluster.accounting.Finished`); the
groups go from the workers to the learner by reference. `cluster.fleet.RayRollouts` implements
`Rollouts` over the actors; tests/test_scheduler.py drives both loops with fakes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from cluster.accounting import Finished, Ledger, LearnerLost
from core.group_meta import GroupMeta


class GroupLost(RuntimeError):
    """A run_group call that did not return a group (it raised or timed out)."""


class WorkerDied(GroupLost):
    """A run_group call whose worker's actor is gone (process killed, node lost): the worker is
    replaced (`Rollouts.restart`, within the restart budget) and its groups are re-issued."""


class LearnerDied(RuntimeError):
    """A learner rank's actor is gone (process killed, node lost): the learner group is rebuilt
    from the last checkpoint (`Loop.recover_learner`, within the learner restart budget)."""

    def __init__(self, rank: int | None, error: BaseException) -> None:
        super().__init__(f"learner rank {rank if rank is not None else '?'} died ({_first_line(error)})")
        self.rank = rank


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@dataclass(frozen=True)
class LearnerRestored:
    """What `Rollouts.restart_learner` did: the learner is at `step` with the weights of
    `checkpoint_version`, published to every worker as `version` (above every version sent before,
    `highest_sent`, so the engines' versions never go back)."""

    step: int
    checkpoint_version: int
    version: int
    highest_sent: int
    source: str
    """Where the state came from: "checkpoint step-000002", "the warm start", "the initial model"."""

    @property
    def orphaned(self) -> tuple[int, int]:
        """Versions (inclusive range) of weights the recovered learner never had: sampled tokens of
        these are from a lost policy. Empty (lo > hi) when nothing newer than the checkpoint was sent."""
        return self.checkpoint_version + 1, self.highest_sent


class Rollouts(Protocol):
    """What the schedulers ask of the actors. Handles are opaque and hashable."""

    num_workers: int

    def dispatch(self, worker: int, task: str, seed: int, group_size: int) -> Any:
        """Starts one group on a worker; returns its pending handle."""

    def wait_any(self, handles: list[Any]) -> Any:
        """Blocks until one of `handles` (groups or a training step) is ready; returns it."""

    def collect(self, handle: Any) -> tuple[GroupMeta, Any]:
        """A finished group's metadata and the reference to the group; raises GroupLost."""

    def start_train(self, refs: list[Any]) -> Any:
        """Starts one learner step on the groups behind `refs`; returns a waitable handle."""

    def train_result(self, handle: Any) -> dict[str, Any]:
        """The learner's metrics of a started step (blocks until it is done)."""

    def send_weights(self) -> Any:
        """Starts sending the learner's current version to every worker (`.version`)."""

    def wait_weights(self, send: Any) -> None:
        """Waits until every worker loaded what `send` sent (None: nothing to wait for)."""

    def sleep_engines(self) -> None: ...

    def wake_engines(self) -> None: ...

    def engine_calls(self) -> float:
        """Engine calls the workers made so far (async: overlap of sampling and training)."""

    def forget(self, handle: Any) -> None:
        """A dispatched group that will never be collected (its worker died)."""

    def restart(self, worker: int, error: BaseException) -> dict[str, Any]:
        """Replaces a dead worker by a new one at the same placement, loaded with the learner's
        current version before it samples; returns the dead one's books: its last known stats and
        `episodes_returned` (episodes of its groups collected). Raises TrainingError when it
        cannot (e.g. NCCL weight sync)."""

    def restart_learner(self, error: BaseException) -> LearnerRestored:
        """Rebuilds the whole learner group (every rank, same placement) at its last checkpoint and
        sends its weights to every worker under a version above every one sent before. Raises
        LearnerLost when it cannot."""


@dataclass
class Progress:
    """Where the run is: learner steps done and the version every worker has (or is loading)."""

    step: int = 0
    version: int = 0
    learner_busy_s: float = 0.0


@dataclass
class StepDone:
    """One learner step, handed to the driver (accounting, metrics, checkpoint, evaluation)."""

    batch: list[Finished]
    learner_metrics: dict[str, Any]
    version_before: int
    collect_s: float
    train_s: float
    sync_s: float
    step_wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    overlap: dict[str, float] | None = None
    """Async: groups in flight and engine calls while the learner trained."""


@dataclass
class Loop:
    """What both loops share: the actors, the books and the run's shape."""

    rollouts: Rollouts
    ledger: Ledger
    progress: Progress
    total_steps: int
    groups_per_step: int
    group_size: int
    on_step: Callable[[StepDone], None]
    in_flight: dict[Any, tuple[int, Any]] = field(default_factory=dict)
    """handle -> (worker, sampler instance) of every group dispatched and not yet received."""
    orphaned: list[tuple[int, int]] = field(default_factory=list)
    """Version ranges of policies lost with a dead learner (`LearnerRestored.orphaned`)."""

    def dispatch(self, worker: int) -> None:
        """Sends the sampler's next instance to a worker."""
        inst = self.ledger.sampler.next()
        self.in_flight[self.rollouts.dispatch(worker, inst.task, inst.seed, self.group_size)] = (worker, inst)

    def receive(self, handle: Any) -> tuple[int | None, Finished | None]:
        """(worker, its group) of a finished call; the group is None when it failed or was lost
        (counted). The worker is None when it died and was replaced: its groups were re-issued
        to the replacement, so it is not free."""
        worker, inst = self.in_flight.pop(handle)
        try:
            meta, ref = self.rollouts.collect(handle)
        except WorkerDied as e:
            self.replace(worker, inst, e.__cause__ or e)
            return None, None
        except GroupLost as e:
            self.ledger.lost(inst, e.__cause__ or e)
            return worker, None
        finished = self.ledger.receive(meta, ref, inst)
        if finished is not None and self.is_orphaned(finished):
            self.ledger.drop("learner_recovered", finished)
            return worker, None
        return worker, finished

    def is_orphaned(self, finished: Finished) -> bool:
        """A token of the group was sampled by a policy lost with a dead learner."""
        versions = {v for e in finished.meta.episodes for v in e.policy_versions}
        return any(lo <= v <= hi for lo, hi in self.orphaned for v in versions)

    def recover_learner(self, died: LearnerDied, on_hand: list[Finished]) -> list[Finished]:
        """A learner rank died: within the budget, the learner group is rebuilt at its last
        checkpoint and the run goes on from that step (the steps after it are undone, their groups
        dropped as learner_recovered). `on_hand`: groups received and not trained (a batch whose
        step died, the async buffer); those with a token of a lost policy are dropped as
        learner_recovered, the others are returned, to be trained. Groups still in flight are
        sorted the same way when they arrive (`receive`)."""
        self.ledger.allow_learner_restart(died)
        try:
            restored = self.rollouts.restart_learner(died)
        except LearnerLost:
            raise
        except Exception as e:  # noqa: BLE001 - one clear line (and the --resume command) instead
            raise LearnerLost(f"{died}; restarting the learner failed: {_first_line(e)}") from e
        self.ledger.learner_recovered(died, restored.step, {
            "restored_from": restored.source, "checkpoint_version": restored.checkpoint_version,
            "highest_version_sent": restored.highest_sent, "policy_version": restored.version})
        self.progress.step, self.progress.version = restored.step, restored.version
        lo, hi = restored.orphaned
        if lo <= hi:
            self.orphaned.append((lo, hi))
        kept = []
        for finished in on_hand:
            if self.is_orphaned(finished):
                self.ledger.drop("learner_recovered", finished)
            else:
                kept.append(finished)
        return kept

    def replace(self, worker: int, inst: Any, error: BaseException) -> None:
        """A worker died running `inst`: within the restart budget, a new worker takes its place
        (current weights loaded) and every group the dead one had in flight is re-issued to it
        with the same task instance (task, seed, sampler index), so the sampler's order and a
        resume's cursor are as if nothing happened."""
        self.ledger.allow_restart(f"w{worker}", error)
        others = [h for h, (w, _) in self.in_flight.items() if w == worker]
        lost = [inst] + [self.in_flight.pop(h)[1] for h in others]
        for h in others:  # handles of the dead actor: never collected, their refs are forgotten
            self.rollouts.forget(h)
        retired = self.rollouts.restart(worker, error)
        self.ledger.worker_replaced(f"w{worker}", error, retired, lost, self.group_size)
        for i in lost:
            self.in_flight[self.rollouts.dispatch(worker, i.task, i.seed, self.group_size)] = (worker, i)

    def drain(self, buffer: deque) -> None:
        """The end of a run: buffered groups and groups still in flight are dropped as run_ended."""
        for f in buffer:
            self.ledger.drop("run_ended", f)
        buffer.clear()
        for handle, (_, inst) in list(self.in_flight.items()):
            try:
                meta, ref = self.rollouts.collect(handle)
            except Exception:  # noqa: BLE001 - the worker died at the end: its episodes are in its stats
                self.ledger.lost_at_end(inst)
                continue
            self.ledger.accounting.returned += meta.num_episodes
            self.ledger.drop("run_ended", Finished(meta, ref, inst))
        self.in_flight.clear()


class SyncScheduler:
    """On-policy: every group of step v is sampled by v (see the module docstring)."""

    def __init__(self, loop: Loop, engines_sleep: bool = False) -> None:
        self.loop = loop
        self.engines_sleep = engines_sleep
        """Colocated: the engines sleep while the learner trains (it gets the GPU memory)."""
        self.asleep = False
        self.batch: list[Finished] = []
        """The step's groups from collection until the driver has booked them (`on_step`)."""

    def collect_batch(self, carried: list[Finished]) -> list[Finished]:
        """`carried`: groups kept from a step whose learner died (sampled by the checkpoint's policy)."""
        loop = self.loop
        batch: list[Finished] = list(carried)
        free = list(range(loop.rollouts.num_workers))
        while len(batch) < loop.groups_per_step:
            while free and len(batch) + len(loop.in_flight) < loop.groups_per_step:
                loop.dispatch(free.pop(0))
            worker, finished = loop.receive(loop.rollouts.wait_any(list(loop.in_flight)))
            if worker is not None:  # None: replaced, its group re-issued (still in flight)
                free.append(worker)
            if finished is not None:
                batch.append(finished)
        return batch

    def run(self) -> None:
        loop = self.loop
        while loop.progress.step < loop.total_steps:
            try:
                self.step()
            except LearnerDied as died:
                if self.asleep:  # the recovered learner's weights load into awake engines
                    loop.rollouts.wake_engines()
                    self.asleep = False
                self.batch = loop.recover_learner(died, self.batch)

    def step(self) -> None:
        """One step: collect (after a learner recovery, `self.batch` may hold groups to re-train),
        train, send v+1 and wait until every worker loaded it, hand the step to the driver."""
        loop, rollouts, progress = self.loop, self.loop.rollouts, self.loop.progress
        t0 = time.monotonic()
        self.batch = batch = self.collect_batch(self.batch)
        collect_s = time.monotonic() - t0
        # --- train on them, then every worker loads v+1 before sampling again ---
        version_before = progress.version
        t1 = time.monotonic()
        if self.engines_sleep:
            rollouts.sleep_engines()
            self.asleep = True
        t_learner = time.monotonic()
        metrics = rollouts.train_result(rollouts.start_train([f.ref for f in batch]))
        progress.learner_busy_s += time.monotonic() - t_learner
        if self.engines_sleep:
            rollouts.wake_engines()
            self.asleep = False
        train_s = time.monotonic() - t1
        t2 = time.monotonic()
        send = rollouts.send_weights()
        rollouts.wait_weights(send)
        progress.version = send.version
        sync_s = time.monotonic() - t2
        progress.step += 1
        self.batch = []  # booked by on_step: a learner death from here on undoes the step instead
        loop.on_step(StepDone(batch, metrics, version_before, collect_s, train_s, sync_s,
                              time.monotonic() - t0, {"groups_dropped_stale": 0.0}))


class AsyncScheduler:
    """Off-policy by at most `max_staleness` versions (see the module docstring)."""

    def __init__(self, loop: Loop, max_staleness: int) -> None:
        self.loop = loop
        self.max_staleness = max_staleness
        self.buffer: deque[Finished] = deque()
        self.train_handle: Any = None
        self.train_batch: list[Finished] = []
        self.version_before = 0
        self.pending_send: Any = None
        """The previous weight send, waited for before the next one starts."""
        self.stale_this_step = 0
        self.calls_at_train_start = 0.0
        self.in_flight_at_start = 0
        self.train_t0 = self.step_t0 = self.wait_t0 = time.monotonic()
        self.collect_s = 0.0

    def _too_old(self, meta: GroupMeta) -> bool:
        return self.loop.progress.version - meta.min_policy_version > self.max_staleness

    def _drop_stale(self, finished: Finished) -> None:
        self.loop.ledger.drop("stale", finished)
        self.stale_this_step += 1

    def maybe_start_train(self) -> None:
        """Starts a learner step when a batch of fresh-enough groups is buffered."""
        loop = self.loop
        while self.buffer and self._too_old(self.buffer[0].meta):
            self._drop_stale(self.buffer.popleft())
        if len(self.buffer) < loop.groups_per_step:
            return
        self.collect_s = time.monotonic() - self.wait_t0
        self.train_batch = [self.buffer.popleft() for _ in range(loop.groups_per_step)]
        self.version_before = loop.progress.version
        lags = [self.version_before - f.meta.min_policy_version for f in self.train_batch]
        assert max(lags) <= self.max_staleness, lags  # the filter above guarantees it
        self.train_handle = loop.rollouts.start_train([f.ref for f in self.train_batch])
        self.train_t0 = time.monotonic()
        self.in_flight_at_start = len(loop.in_flight)
        self.calls_at_train_start = loop.rollouts.engine_calls()

    def finish_train(self) -> None:
        """The learner step is done: send v+1 (workers load it between engine batches, without
        stopping), then hand the step to the driver."""
        loop, rollouts, progress = self.loop, self.loop.rollouts, self.loop.progress
        metrics = rollouts.train_result(self.train_handle)
        train_s = time.monotonic() - self.train_t0
        progress.learner_busy_s += train_s
        self.train_handle = None
        overlap = {
            "rollout_in_flight_during_train": float(min(self.in_flight_at_start, len(loop.in_flight))),
            "engine_calls_during_train": rollouts.engine_calls() - self.calls_at_train_start,
        }
        t2 = time.monotonic()
        rollouts.wait_weights(self.pending_send)  # the previous version reached everyone
        if self.pending_send is not None:
            progress.version = self.pending_send.version
        self.pending_send = rollouts.send_weights()
        # Groups sampled from here on may carry the new version; staleness counts it.
        progress.version = self.pending_send.version
        sync_s = time.monotonic() - t2
        progress.step += 1
        done = StepDone(self.train_batch, metrics, self.version_before, self.collect_s, train_s, sync_s,
                        time.monotonic() - self.step_t0,
                        {"groups_dropped_stale": float(self.stale_this_step), **overlap}, overlap)
        self.stale_this_step = 0
        self.step_t0 = self.wait_t0 = time.monotonic()
        self.train_batch = []  # booked by on_step: a learner death from here on undoes the step
        loop.on_step(done)

    def recover(self, died: LearnerDied) -> None:
        """The learner died: the batch it was training and the buffer are sorted by
        `Loop.recover_learner` (kept groups go back to the buffer, oldest first); the send in
        flight died with it (its object belonged to the dead learner), nothing waits for it."""
        kept = self.loop.recover_learner(died, self.train_batch + list(self.buffer))
        self.buffer = deque(kept)
        self.train_batch, self.train_handle, self.pending_send = [], None, None
        self.version_before = self.loop.progress.version

    def on_group(self, handle: Any) -> None:
        """A group finished: the worker gets its next instance at once."""
        worker, finished = self.loop.receive(handle)
        if worker is None:  # it died; its replacement runs the re-issued group
            return
        self.loop.dispatch(worker)
        if finished is None:
            return
        if self._too_old(finished.meta):
            self._drop_stale(finished)
        else:
            self.buffer.append(finished)

    def advance(self) -> None:
        """Starts a learner step if a batch is ready, then handles whatever finishes first."""
        loop = self.loop
        if self.train_handle is None:
            self.maybe_start_train()
        waitables = list(loop.in_flight) + ([self.train_handle] if self.train_handle is not None else [])
        ready = loop.rollouts.wait_any(waitables)
        if self.train_handle is not None and ready == self.train_handle:
            self.finish_train()
        else:
            self.on_group(ready)

    def run(self) -> None:
        loop = self.loop
        for i in range(loop.rollouts.num_workers):
            loop.dispatch(i)
        self.version_before = loop.progress.version
        self.train_t0 = self.step_t0 = self.wait_t0 = time.monotonic()
        try:
            while loop.progress.step < loop.total_steps:
                try:
                    self.advance()
                except LearnerDied as died:
                    self.recover(died)
            loop.rollouts.wait_weights(self.pending_send)
        except BaseException:
            loop.in_flight.clear()  # an error or Ctrl-C: close() stops the workers, nothing to wait for
            raise
        # --- drain: groups still in flight finish and are counted as run_ended ---
        loop.drain(self.buffer)
