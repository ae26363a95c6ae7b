"""Chaos: one real run (real Chromium on MiniWoB, env servers, Ray workers, learner) in which the
test kills, at seeded moments, a Chromium process, an env server, a rollout worker and the learner.

The run must finish its steps, its books must balance (every episode started is trained or
dropped with a counted reason), no infrastructure failure may be scored (read back from the
Parquet trajectories: a failed episode has no return and never enters a batch), and no process
the run started may outlive it. The same code makes the README's fault table:
`python -m cluster.chaos --config local ...` (cluster/chaos.py)."""

from __future__ import annotations

import psutil
import pytest

from cluster import chaos

STEPS = chaos.min_steps(list(chaos.KINDS))


def _chaos_args(run_dir) -> list[str]:
    return ["--config", "local", "--cluster.run_dir", str(run_dir), "--cluster.run_name", "chaos",
            "--cluster.total_steps", str(STEPS), "--checkpoint.every_steps", "1", "--checkpoint.keep_last", "1",
            "--warm_start.enabled", "false", "--eval.before_training", "false", "--eval.at_end", "false",
            "--env.reset_mode", "page", "--grpo.num_generations", "2", "--logging.progress_bar", "false"]


def _env_processes() -> set[int]:
    """Live processes of any env pool: env servers and the Chromium they launched inherit the pool's
    tag variable, so they are found even after their parent died and they were re-parented."""
    from envs.browsergym.pool import POOL_TAG_VAR

    found = set()
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and POOL_TAG_VAR in proc.environ():
                found.add(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
@pytest.mark.browser
def test_a_run_survives_chromium_env_server_worker_and_learner_kills(ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    before = _env_processes()
    result = chaos.run(_chaos_args(tmp_path / "run"), list(chaos.KINDS), seed=0)
    summary, injections = result["summary"], result["injections"]

    # STEPS is a minimum: the monkey adds steps while its last kill is not yet booked
    assert summary["steps"] == STEPS + result["extended"] and summary["learner_version"] >= summary["steps"]
    # one at a time: each kill after the step that booked the previous one's recovery
    kills = sorted(injections, key=lambda i: i["at"])
    assert all(a["booked_step"] is not None and a["booked_step"] <= b["after_step"] for a, b in zip(kills, kills[1:]))
    done = {i["kind"]: i for i in injections}
    assert set(done) == set(chaos.KINDS)
    for kind, inj in done.items():
        assert inj["at"] and inj["pid"], (kind, inj)  # each kill really happened
    rows = {r["kind"]: r for r in result["table"]}
    for kind in chaos.KINDS:
        assert rows[kind]["injected"] == 1 and rows[kind]["recover_s"], rows[kind]  # training went on after it
    acc = summary["accounting"]
    assert acc["balanced"] and acc["started"] == acc["trained"] + sum(acc["dropped"].values()), acc
    assert summary["worker_restarts"] >= 1 and summary.get("learner_restarts", 0) >= 1

    table = pq.read_table(str(tmp_path / "run" / "trajectories")).to_pandas()
    failed = table[table["status"] == "failed"]
    assert len(failed) >= 1  # the kills failed episodes ...
    assert failed["episode_return"].isna().all()  # ... and none of them carries a score

    leftovers = _env_processes() - before  # env servers and browsers of killed workers included
    assert not leftovers, {p: psutil.Process(p).cmdline()[:3] for p in leftovers if psutil.pid_exists(p)}


def test_the_next_kill_waits_until_the_last_ones_recovery_is_booked(tmp_path, monkeypatch):
    """The sequencing alone, on a written metrics file and no processes: a kill is booked by the
    first step record with its kind's counter; until then no other kill is scheduled; a kill
    never booked is given up after MAX_WAIT_STEPS steps."""
    import json

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = type("T", (), {"run_dir": run_dir})()
    injected: list[str] = []
    monkeypatch.setattr(chaos.threading, "Timer", lambda delay, fn, args: type("Now", (), {
        "daemon": False, "start": lambda self: fn(*args), "cancel": lambda self: None})())
    monkeypatch.setattr(chaos, "_target", lambda kind, trainer, rng: (10 ** 7, kind))
    monkeypatch.setattr(chaos.os, "kill", lambda pid, sig: injected.append(pid))
    plan = [chaos.Injection("worker", 1, 0.0), chaos.Injection("learner", 0, 0.0), chaos.Injection("env_server", 0, 0.0)]
    monkey = chaos.ChaosMonkey(plan)
    counters = {2: {}, 3: {"worker_restarts": 1.0, "episodes_failed": 2.0}, 4: {}, 5: {}, 6: {}, 7: {}, 8: {}}

    def end_step(step):
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "policy_version": step, **counters.get(step, {})}) + "\n")
        monkey(trainer, step)

    end_step(1)
    assert [i.kind for i in plan if i.at] == ["worker"]
    end_step(2)  # not booked yet: nothing new
    assert [i.kind for i in plan if i.at] == ["worker"]
    end_step(3)  # booked: the learner's kill goes
    assert plan[0].booked_step == 3 and plan[0].episodes_failed == 2 and plan[1].at and not plan[2].at
    for step in (4, 5, 6):  # the learner's kill is never booked: given up after MAX_WAIT_STEPS
        end_step(step)
    assert plan[1].booked_step is None and plan[2].at and plan[2].after_step == 6
    rows = {r["kind"]: r for r in chaos.fault_table(monkey, {"worker_died": 4})}
    assert rows["worker"]["injected"] == 1 and rows["worker"]["episodes_dropped"] == 4
    assert rows["learner"]["injected"] == 1 and rows["learner"]["recover_s"] == []


def test_a_kill_in_the_last_step_extends_the_run_until_it_is_booked(tmp_path, monkeypatch):
    """The run's length is a minimum: the last kill made in the last step gets more steps, one at a
    time, until a step books it (CI once ended a run right after its learner kill), and never more
    than MAX_WAIT_STEPS per kind."""
    import json
    from types import SimpleNamespace

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = SimpleNamespace(run_dir=run_dir, config=SimpleNamespace(cluster=SimpleNamespace(total_steps=2)))
    trainer.extend_run = lambda n: setattr(trainer.config.cluster, "total_steps", trainer.config.cluster.total_steps + n)
    monkeypatch.setattr(chaos.threading, "Timer", lambda delay, fn, args: type("Now", (), {
        "daemon": False, "start": lambda self: fn(*args), "cancel": lambda self: None})())
    monkeypatch.setattr(chaos, "_target", lambda kind, trainer, rng: (10 ** 7, kind))
    monkeypatch.setattr(chaos.os, "kill", lambda pid, sig: None)
    monkey = chaos.ChaosMonkey([chaos.Injection("learner", 2, 0.0)])

    def end_step(step, **counters):
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "policy_version": step, **counters}) + "\n")
        monkey(trainer, step)

    end_step(1)
    assert trainer.config.cluster.total_steps == 2
    end_step(2)  # the kill goes after the last step: one more step
    assert monkey.injections[0].at and trainer.config.cluster.total_steps == 3
    end_step(3)  # not booked yet: another
    assert trainer.config.cluster.total_steps == 4
    end_step(4, learner_restarts=1.0)  # booked: the run ends here
    assert monkey.injections[0].booked_step == 4 and trainer.config.cluster.total_steps == 4 and monkey.extended == 2

    never = chaos.ChaosMonkey([chaos.Injection("worker", 1, 0.0)])
    trainer.config.cluster.total_steps = 1
    monkey = never
    for step in range(1, 10):
        end_step(step)
    assert never.extended == chaos.MAX_WAIT_STEPS and trainer.config.cluster.total_steps == 1 + chaos.MAX_WAIT_STEPS
