"""The sync and async schedulers (cluster/scheduler.py) over a fake `Rollouts`: no Ray, no actors.

The fake plays the actors' part faithfully where the schedulers depend on it: a group carries the
policy version its worker had when the group was dispatched, `wait_any` returns the oldest
pending handle (a group dispatched before a learner step started finishes before that step), the
learner's version moves with every step and a worker's when weights are sent to it.
Groups are opaque refs; the learner side records which refs it was given.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from cluster.accounting import LearnerLost, Ledger, TrainingError
from cluster.config import SamplerConfig
from cluster.sampler import TaskSampler
from cluster.scheduler import (
    AsyncScheduler,
    GroupLost,
    LearnerDied,
    LearnerRestored,
    Loop,
    Progress,
    SyncScheduler,
    WorkerDied,
)
from core.group_meta import EpisodeMeta, GroupMeta

G = 2
pytestmark = pytest.mark.timeout(60)  # a scheduler that never finishes fails, not hangs


class FakeRollouts:
    def __init__(self, num_workers: int, outcome=lambda n, worker: "ok") -> None:
        self.num_workers = num_workers
        self.outcome = outcome
        """(dispatch number, worker) -> "ok" | "lost" | "failed" | "mismatch" | "lost_at_end" | "died"."""
        self.counter = itertools.count()
        self.pending: dict[int, tuple] = {}
        self.worker_version = [0] * num_workers
        self.learner_version = 0
        self.dispatched: list[tuple[int, str, int]] = []
        self.trained_refs: list[list] = []
        self.train_handle = None
        self.sent: list[int] = []
        self.waited: list[int] = []
        self.engine_events: list[str] = []
        self.dispatches = 0
        # A worker's own books, as its stats report them: every dispatched group starts G episodes.
        self.started = [0] * num_workers
        self.returned = [0] * num_workers
        self.retired_started = 0
        self.restarts: list[tuple[int, int, int]] = []
        """(worker, dispatch count, version loaded) of every restart."""
        self.forgotten: list[int] = []

    def dispatch(self, worker, task, seed, group_size):
        handle = next(self.counter)
        kind = self.outcome(self.dispatches, worker)
        self.dispatches += 1
        self.started[worker] += group_size
        self.pending[handle] = (worker, task, seed, group_size, self.worker_version[worker], kind)
        self.dispatched.append((worker, task, seed))
        return handle

    def wait_any(self, handles):
        return min(handles)  # the oldest first: FIFO completion

    def collect(self, handle):
        worker, task, seed, g, version, kind = self.pending.pop(handle)
        if kind in ("lost", "lost_at_end"):
            raise GroupLost(f"worker {worker} died") from RuntimeError(f"worker {worker} died")
        if kind == "died":
            raise WorkerDied(f"actor of worker {worker} died") from RuntimeError(f"actor of worker {worker} died")
        self.returned[worker] += g
        status = "failed" if kind == "failed" else "finished"
        reason = "EnvEpisodeMismatchError: seed 9 != 1" if kind == "mismatch" else ""
        episodes = tuple(EpisodeMeta(status, True, 1.0, status != "failed", (version, version), reason) for _ in range(g))
        return GroupMeta(f"g{handle}", task, seed, episodes, f"w{worker}", 2 * g), ("ref", handle)

    def start_train(self, refs):
        self.trained_refs.append(list(refs))
        self.train_handle = next(self.counter)
        return self.train_handle

    def train_result(self, handle):
        assert handle == self.train_handle
        self.learner_version += 1
        return {"episodes": G * len(self.trained_refs[-1]), "loss": 0.5}

    def send_weights(self):
        # The workers load a sent version between engine batches: groups dispatched from here on
        # carry it, groups already in flight keep the version they started with.
        self.sent.append(self.learner_version)
        self.worker_version = [self.learner_version] * self.num_workers
        return SimpleNamespace(version=self.learner_version)

    def wait_weights(self, send):
        if send is not None:
            self.waited.append(send.version)

    def sleep_engines(self):
        self.engine_events.append("sleep")

    def wake_engines(self):
        self.engine_events.append("wake")

    def engine_calls(self):
        return float(self.dispatches)

    def forget(self, handle):
        self.forgotten.append(handle)
        self.pending.pop(handle)

    def restart(self, worker, error):
        # The replacement starts with the learner's current version and counters at 0.
        retired = {"episodes_started": self.started[worker], "episodes_returned": self.returned[worker]}
        self.retired_started += self.started[worker]
        self.started[worker] = self.returned[worker] = 0
        self.worker_version[worker] = self.learner_version
        self.restarts.append((worker, self.dispatches, self.learner_version))
        return retired


def _loop(rollouts, total_steps=3, groups_per_step=2, max_failures=3, sampler=None, **ledger_options):
    sampler = sampler or TaskSampler(SamplerConfig(tasks=["click-test", "click-button"]), seed=0)
    steps = []
    ledger = Ledger(sampler, max_failures, **ledger_options)
    progress = Progress()

    def on_step(done):  # what the driver's on_step does first: the books
        steps.append(done)
        ledger.trained(progress.step, done.batch, done.learner_metrics, done.version_before)

    return Loop(rollouts, ledger, progress, total_steps, groups_per_step, G, on_step), steps


def _every_index_once(ledger: Ledger) -> list[int]:
    trained = [i[2] for r in ledger.steps for i in r.instances]
    dropped = [d[2] for d in ledger.accounting.dropped_instances]
    return sorted(trained + dropped)


def test_sync_trains_on_policy_and_hands_the_learner_refs_only():
    rollouts = FakeRollouts(2)
    loop, steps = _loop(rollouts)
    SyncScheduler(loop).run()
    assert loop.progress.step == 3 and loop.progress.version == 3
    assert [d.version_before for d in steps] == [0, 1, 2]
    for done, refs in zip(steps, rollouts.trained_refs):
        assert all(v == done.version_before for f in done.batch for v in f.meta.trainable_versions)  # on-policy
        assert refs == [f.ref for f in done.batch] and all(r[0] == "ref" for r in refs)  # by reference
    assert rollouts.waited == [1, 2, 3]  # every step waited until every worker loaded v+1
    acc = loop.ledger.accounting
    assert acc.trained == acc.returned == 3 * 2 * G and acc.groups_trained == 6
    assert loop.ledger.sampler.unsettled() == [] and _every_index_once(loop.ledger) == list(range(6))
    assert not loop.in_flight


def test_sync_colocated_engines_sleep_only_while_the_learner_trains():
    rollouts = FakeRollouts(2)
    loop, _ = _loop(rollouts, total_steps=2)
    SyncScheduler(loop, engines_sleep=True).run()
    assert rollouts.engine_events == ["sleep", "wake", "sleep", "wake"]


def test_a_lost_group_is_counted_settled_and_its_worker_gets_the_next_instance():
    rollouts = FakeRollouts(2, outcome=lambda n, w: "lost" if n == 1 else "ok")
    loop, steps = _loop(rollouts, total_steps=2)
    events = []
    loop.ledger.log_event = events.append
    SyncScheduler(loop).run()
    acc = loop.ledger.accounting
    assert loop.ledger.actor_failures == 1 and events[0]["event"] == "actor_failure"
    assert [d[3] for d in acc.dropped_instances] == ["actor_failure"]
    assert all(len(d.batch) == 2 for d in steps)  # the batch was still filled
    assert len(rollouts.dispatched) == 5  # one re-dispatch for the lost group
    assert loop.ledger.sampler.unsettled() == [] and _every_index_once(loop.ledger) == list(range(5))


def test_redispatch_is_bounded_by_max_actor_failures():
    rollouts = FakeRollouts(2, outcome=lambda n, w: "lost" if w == 0 else "ok")  # worker 0 always fails
    loop, _ = _loop(rollouts, total_steps=5, max_failures=2)
    with pytest.raises(TrainingError, match="3 rollout-worker failures; last: worker 0 died"):
        SyncScheduler(loop).run()
    assert loop.ledger.actor_failures == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_dead_worker_is_replaced_and_its_group_reissued_to_the_replacement(mode):
    # Dispatch 3 (worker 1, the second step's group in sync) dies with its actor.
    rollouts = FakeRollouts(2, outcome=lambda n, w: "died" if n == 3 else "ok")
    loop, steps = _loop(rollouts, total_steps=3, restart_budget=1)
    events = []
    loop.ledger.log_event = events.append
    SyncScheduler(loop).run() if mode == "sync" else AsyncScheduler(loop, max_staleness=1).run()
    assert loop.progress.step == 3 and len(steps) == 3 and all(len(d.batch) == 2 for d in steps)
    dead_worker, task, seed = rollouts.dispatched[3]
    # restarted once; the first dispatch after it is the same task instance, to the replaced worker
    [(worker, after, version)] = rollouts.restarts
    assert worker == dead_worker and rollouts.dispatched[after] == (dead_worker, task, seed)
    if mode == "sync":  # the replacement had the learner's version: every batch is still on-policy
        assert version == 1
        for done in steps:
            assert all(v == done.version_before for f in done.batch for v in f.meta.trainable_versions)
    ledger, acc = loop.ledger, loop.ledger.accounting
    assert ledger.worker_restarts == 1 and ledger.actor_failures == 0 and "actor_failure" not in {
        d[3] for d in acc.dropped_instances}
    assert events[0]["event"] == "worker_restart" and events[0]["worker"] == f"w{dead_worker}"
    assert (task, seed) in [(i[0], i[1]) for r in ledger.steps for i in r.instances] or mode == "async"
    # every index has one fate (the re-issued one is not counted twice) and the books balance
    assert len(_every_index_once(ledger)) == len(set(_every_index_once(ledger)))
    assert acc.dropped["worker_died"] == G
    acc.finalize(sum(rollouts.started))
    assert acc.started == sum(rollouts.started) + rollouts.retired_started and acc.balanced
    assert acc.dropped["rerun_attempt"] == 0


def test_restart_budget_exhausted_ends_the_run_naming_the_worker_and_its_last_error():
    rollouts = FakeRollouts(2, outcome=lambda n, w: "died" if w == 0 else "ok")  # worker 0 always dies
    loop, _ = _loop(rollouts, total_steps=5, restart_budget=2)
    with pytest.raises(TrainingError, match=r"rollout worker w0 died and the restart budget is used up "
                                            r"\(2 of 2 restarts.*last error: actor of worker 0 died"):
        SyncScheduler(loop).run()
    assert [r[0] for r in rollouts.restarts] == [0, 0] and loop.ledger.worker_restarts == 2
    # budget 0 (the Ledger's default): a dead worker ends the run at once
    loop, _ = _loop(FakeRollouts(1, outcome=lambda n, w: "died"), total_steps=1, groups_per_step=1)
    with pytest.raises(TrainingError, match="w0 died.*0 of 0"):
        SyncScheduler(loop).run()


def test_restart_budget_is_per_sliding_window():
    now = [0.0]
    ledger = Ledger(TaskSampler(SamplerConfig(tasks=["click-test"]), seed=0), 0, restart_budget=2,
                    restart_window_s=100.0, clock=lambda: now[0])
    for t in (0.0, 50.0, 101.0, 151.0):  # never more than 2 within any 100 s
        now[0] = t
        ledger.allow_restart("w1", RuntimeError("died"))
    now[0] = 160.0
    with pytest.raises(TrainingError, match="w1 died.*last error: died again"):
        ledger.allow_restart("w1", RuntimeError("died again"))


def test_a_dead_workers_other_groups_in_flight_go_to_its_replacement():
    # Loop-level: a worker with two groups in flight dies; both are re-issued once, the second
    # handle of the dead actor is forgotten (never collected).
    rollouts = FakeRollouts(1, outcome=lambda n, w: "died" if n < 2 else "ok")
    loop, _ = _loop(rollouts, restart_budget=1)
    loop.dispatch(0)
    loop.dispatch(0)
    first, second = list(loop.in_flight)
    assert loop.receive(first) == (None, None)
    assert rollouts.forgotten == [second] and len(loop.in_flight) == 2 and len(rollouts.restarts) == 1
    assert [d[1:] for d in rollouts.dispatched[2:]] == [d[1:] for d in rollouts.dispatched[:2]]
    assert loop.ledger.accounting.dropped["worker_died"] == 2 * G


def test_failed_groups_are_dropped_and_a_mismatched_episode_stops_the_run():
    rollouts = FakeRollouts(1, outcome=lambda n, w: "failed" if n == 0 else "ok")
    loop, _ = _loop(rollouts, total_steps=1, groups_per_step=1)
    SyncScheduler(loop).run()
    acc = loop.ledger.accounting
    assert acc.dropped["failed_group"] == G and acc.groups_dropped["failed_group"] == 1 and acc.trained == G
    rollouts = FakeRollouts(1, outcome=lambda n, w: "mismatch")
    loop, _ = _loop(rollouts, total_steps=1, groups_per_step=1)
    with pytest.raises(TrainingError, match="an env server started the wrong episode: EnvEpisodeMismatchError"):
        SyncScheduler(loop).run()


def test_async_drops_stale_groups_and_every_index_has_one_fate():
    # Three workers, batches of one, max_staleness 0: the groups dispatched before a step's new
    # weights reached the workers are one version behind by the time they would be trained.
    rollouts = FakeRollouts(3)
    loop, steps = _loop(rollouts, total_steps=3, groups_per_step=1)
    AsyncScheduler(loop, max_staleness=0).run()
    acc = loop.ledger.accounting
    assert loop.progress.step == 3 and rollouts.learner_version == 3
    assert acc.dropped["stale"] > 0 and acc.groups_dropped["stale"] == acc.dropped["stale"] // G
    for done in steps:  # nothing older than max_staleness was trained
        assert all(done.version_before - v <= 0 for f in done.batch for v in f.meta.trainable_versions)
        assert done.overlap is not None and "rollout_in_flight_during_train" in done.extra
    assert sum(d.extra["groups_dropped_stale"] for d in steps) <= acc.groups_dropped["stale"]
    # the drain: groups in flight at the end are counted as run_ended; nothing is left in flight
    assert acc.groups_dropped["run_ended"] >= 1 and not loop.in_flight and not rollouts.pending
    assert acc.returned == acc.trained + sum(acc.dropped.values())
    assert _every_index_once(loop.ledger) == list(range(len(rollouts.dispatched)))
    assert loop.ledger.sampler.unsettled() == []


def test_async_with_staleness_trains_without_dropping_and_loses_a_worker_at_the_end():
    # The last dispatch's worker dies while the run drains: recorded, not counted as a failure.
    rollouts = FakeRollouts(2, outcome=lambda n, w: "lost_at_end" if n >= 6 else "ok")
    loop, steps = _loop(rollouts, total_steps=2, groups_per_step=2)
    AsyncScheduler(loop, max_staleness=1).run()
    acc = loop.ledger.accounting
    assert acc.dropped["stale"] == 0 and len(steps) == 2
    assert "actor_failure" in [d[3] for d in acc.dropped_instances] and loop.ledger.actor_failures == 0


def test_async_error_in_a_step_clears_the_groups_in_flight():
    rollouts = FakeRollouts(2)
    loop, _ = _loop(rollouts, total_steps=3, groups_per_step=1)

    def interrupt(done):
        raise KeyboardInterrupt("test")

    loop.on_step = interrupt
    with pytest.raises(KeyboardInterrupt):
        AsyncScheduler(loop, max_staleness=1).run()
    assert not loop.in_flight  # close() stops the workers; nothing is waited for


def test_resume_reissues_the_groups_in_flight_at_the_checkpoint():
    # A first run hands out 4 instances and trains 2; its cursor keeps the other 2 unsettled.
    first, _ = _loop(FakeRollouts(2), total_steps=1, groups_per_step=2)
    sampler = first.ledger.sampler
    handed = [sampler.next() for _ in range(4)]
    for inst in handed[:2]:
        sampler.settle(inst.index)
    cursor = first.ledger.cursor(step=1, version=1)
    assert [i[2] for i in cursor["unsettled_instances"]] == [2, 3]

    resumed_sampler = TaskSampler(SamplerConfig(tasks=["click-test", "click-button"]), seed=0)
    rollouts = FakeRollouts(2)
    loop, _ = _loop(rollouts, total_steps=3, groups_per_step=2, sampler=resumed_sampler)
    loop.progress.step = loop.ledger.resume(cursor)
    AsyncScheduler(loop, max_staleness=2).run()
    # the unsettled instances are played first, as the same task instance
    assert [(t, s) for _, t, s in rollouts.dispatched[:2]] == [(i.task, i.seed) for i in handed[2:]]
    trained = [i[2] for r in loop.ledger.steps for i in r.instances]
    assert {2, 3} <= set(trained) and len(trained) == len(set(trained))
    assert _every_index_once(loop.ledger) == list(range(2, 2 + len(rollouts.dispatched)))


def test_step_figures_come_from_metadata_and_difference_the_worker_counters():
    from cluster.accounting import Finished, StepFigures
    from cluster.scheduler import StepDone

    def meta(task, versions, success, ret, status="finished"):
        eps = tuple(EpisodeMeta(status, s, r, status != "failed", v) for v, s, r in zip(versions, success, ret))
        return GroupMeta(f"g-{task}", task, 1, eps)

    batch = [Finished(meta("a", [(3, 4), (4,)], [True, False], [1.0, 0.0]), ("ref", 0), SimpleNamespace(index=0)),
             Finished(meta("b", [(4,), (2,)], [True, False], [1.0, 0.5], "finished"), ("ref", 1), SimpleNamespace(index=1))]
    done = StepDone(batch, {"episodes": 4, "tokens": 100.0, "loss": 0.25}, 4, 1.0, 2.0, 0.5, 4.0,
                    {"groups_dropped_stale": 1.0})
    figures = StepFigures()
    first = figures.record(done, 5, [{"episodes_started": 6, "steps": 10}, {"episodes_started": 2}], 4, 8.0, 2.0)
    assert first["episodes_started"] == 8 and first["env_steps"] == 10
    assert first["success_rate"] == 0.5 and first["reward_mean"] == 2.5 / 4
    assert first["policy_lag_max"] == 2.0 and first["policy_lag_mean"] == (1 + 0 + 0 + 0 + 2) / 5
    assert first["task/a/success_rate"] == 0.5 and first["task/b/reward_mean"] == 0.75
    assert first["learner/loss"] == 0.25 and first["tokens_per_s"] == 25.0 and first["groups_dropped_stale"] == 1.0
    assert first["learner_idle_frac"] == 0.75 and first["tasks"] == ["a", "b"] and first["policy_version"] == 5
    second = figures.record(done, 6, [{"episodes_started": 9, "steps": 12}, {"episodes_started": 2}], 8, 16.0, 4.0)
    assert second["episodes_started"] == 3 and second["env_steps"] == 2  # per step, not cumulative


# --- a dead learner rank: the learner group goes back to its last checkpoint -----------------------


class LearnerDiesFake(FakeRollouts):
    """The learner dies on the train calls numbered in `die_at` (1-based); `restart_learner` plays
    `cluster.learner_recovery`: the learner is back at the last checkpoint's (step, version) and
    sends it to every worker under a version above every one sent (or the checkpoint's own)."""

    def __init__(self, num_workers: int, die_at: set[int]) -> None:
        super().__init__(num_workers)
        self.die_at = die_at
        self.trains = 0
        self.checkpoint = (0, 0)
        """(step, version) of the latest checkpoint (the test's on_step saves them)."""
        self.restored: list = []

    def train_result(self, handle):
        self.trains += 1
        if self.trains in self.die_at:
            raise LearnerDied(0, RuntimeError("ActorDiedError: the actor died unexpectedly"))
        return super().train_result(handle)

    def restart_learner(self, error):
        step, version = self.checkpoint
        highest = max(self.sent, default=0)
        new = version if highest <= version else highest + 1
        self.learner_version = new
        self.send_weights()
        self.restored.append(LearnerRestored(step, version, new, highest, "checkpoint"))
        return self.restored[-1]


def _recovering_loop(rollouts, checkpoint_every, total_steps=4, budget=1):
    loop, steps = _loop(rollouts, total_steps=total_steps, learner_restart_budget=budget)
    events = []
    loop.ledger.log_event = events.append
    driver_on_step = loop.on_step

    def on_step(done):  # the driver: the books, then a checkpoint every `checkpoint_every` steps
        driver_on_step(done)
        if loop.progress.step % checkpoint_every == 0:
            rollouts.checkpoint = (loop.progress.step, loop.progress.version)

    loop.on_step = on_step
    return loop, steps, events


def _check_recovered_books(loop, rollouts, total_steps):
    ledger, acc = loop.ledger, loop.ledger.accounting
    assert loop.progress.step == total_steps and [r.step for r in ledger.steps] == list(range(1, total_steps + 1))
    assert rollouts.sent == sorted(rollouts.sent)  # the versions the engines saw never went back
    assert len(_every_index_once(ledger)) == len(set(_every_index_once(ledger)))  # one fate per instance
    assert ledger.sampler.unsettled() == []
    acc.finalize(sum(rollouts.started))
    assert acc.balanced and acc.dropped["rerun_attempt"] == 0, acc.as_dict()
    for restored in rollouts.restored:  # nothing trained after a recovery came from a lost policy
        lo, hi = restored.orphaned
        assert not any(lo <= v <= hi for r in ledger.steps for v in (r.min_token_version, r.max_token_version)
                       if r.learner_version >= restored.version)


def test_sync_learner_death_goes_back_to_the_checkpoint_and_drops_what_the_lost_policies_made():
    # Checkpoints at steps 2 and 4; the learner dies training step 4 (train call 4), so steps 3's
    # update is lost (undone) and step 4's batch was sampled by v3, a policy the restored learner
    # never had: both are dropped as learner_recovered; the v2 weights go out as v4.
    rollouts = LearnerDiesFake(2, die_at={4})
    loop, steps, events = _recovering_loop(rollouts, checkpoint_every=2)
    SyncScheduler(loop).run()
    [restored] = rollouts.restored
    assert (restored.step, restored.checkpoint_version, restored.version, restored.orphaned) == (2, 2, 4, (3, 3))
    assert rollouts.sent == [1, 2, 3, 4, 5, 6] and loop.progress.version == 6
    ledger, acc = loop.ledger, loop.ledger.accounting
    assert ledger.learner_restarts == 1
    [event] = [e for e in events if e["event"] == "learner_restart"]
    assert event["steps_undone"] == [3] and event["checkpoint_step"] == 2 and event["policy_version"] == 4
    assert acc.groups_dropped["learner_recovered"] == 4 and acc.dropped["learner_recovered"] == 4 * G
    assert acc.groups_trained == 4 * 2 and acc.trained == 4 * 2 * G  # the undone step left the trained books
    assert [d.version_before for d in steps] == [0, 1, 2, 4, 5]  # step 3 ran twice: at v2, then (restored) v4
    _check_recovered_books(loop, rollouts, 4)


def test_sync_batch_sampled_by_the_checkpoints_policy_is_retrained():
    # A checkpoint every step: when the learner dies training step 3, the checkpoint (step 2, v2) is
    # the policy that sampled the batch; nothing newer was sent, so the version stays 2 and the same
    # groups are trained again: nothing dropped.
    rollouts = LearnerDiesFake(2, die_at={3})
    loop, _, _ = _recovering_loop(rollouts, checkpoint_every=1, total_steps=3)
    SyncScheduler(loop).run()
    assert rollouts.restored[0].version == 2 and rollouts.sent == [1, 2, 2, 3]
    assert rollouts.trained_refs[2] == rollouts.trained_refs[3]  # re-trained, same refs
    assert "learner_recovered" not in loop.ledger.accounting.dropped
    _check_recovered_books(loop, rollouts, 3)


def test_async_learner_death_recovers_and_the_books_balance():
    # Checkpoint at step 2; the learner dies training step 4: step 3 is undone, the groups in flight
    # or buffered with v3 tokens are dropped as learner_recovered when they are sorted or arrive.
    rollouts = LearnerDiesFake(2, die_at={4})
    loop, _, events = _recovering_loop(rollouts, checkpoint_every=2, total_steps=4)
    AsyncScheduler(loop, max_staleness=1).run()
    assert loop.ledger.learner_restarts == 1 and rollouts.restored[0].orphaned == (3, 3)
    assert rollouts.sent == [1, 2, 3, 4, 5, 6] and events[0]["steps_undone"] == [3]
    assert loop.ledger.accounting.groups_dropped["learner_recovered"] >= 3  # step 3's two + v3-sampled ones
    assert [r.learner_version for r in loop.ledger.steps] == [0, 1, 4, 5]
    _check_recovered_books(loop, rollouts, 4)


def test_learner_death_past_the_budget_ends_with_the_resume_line():
    from cluster.driver import _one_line_failure

    rollouts = LearnerDiesFake(2, die_at={2, 3})  # budget 1: the second death ends the run
    loop, _, _ = _recovering_loop(rollouts, checkpoint_every=1)
    with pytest.raises(LearnerLost, match=r"learner rank 0 died .*budget is used up \(1 of 1 restarts within 3600 s") as e:
        SyncScheduler(loop).run()
    assert loop.ledger.learner_restarts == 1
    line = _one_line_failure(e.value, "/runs/r1")
    assert line.startswith("bgrpo train: learner rank 0 died (ActorDiedError")
    assert line.endswith("the run folder is /runs/r1; continue from its last checkpoint with: "
                         "bgrpo train --resume /runs/r1") and "\n" not in line
    loop, _, _ = _recovering_loop(LearnerDiesFake(1, die_at={1}), checkpoint_every=1, budget=0)
    with pytest.raises(LearnerLost, match=r"0 of 0 restarts"):
        SyncScheduler(loop).run()
