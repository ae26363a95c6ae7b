"""`UpdateGate` (actors/engines/update_gate.py) with real threads: where a weight update's job runs
in each mode, and what the engine's accounting records. The engine steps are played by a thread
that holds the engine lock and calls `run_posted` between its "steps", as the vLLM stepper does."""

from __future__ import annotations

import threading
import time

import pytest

from actors.engines.update_gate import UpdateGate


def _apply_in_thread(gate: UpdateGate, job) -> threading.Thread:
    thread = threading.Thread(target=gate.apply, args=(job,))
    thread.start()
    return thread


def test_drained_update_waits_for_the_running_call():
    lock = threading.Lock()
    gate = UpdateGate(lock, "drained")
    ran = threading.Event()
    with lock:  # a generate call runs
        thread = _apply_in_thread(gate, ran.set)
        time.sleep(0.2)
        assert not ran.is_set() and not gate.pending()  # never posted: it waits for the lock
    thread.join(timeout=10)
    assert ran.is_set() and gate.timing.updates == 1 and gate.timing.applied_mid_call == 0


def test_in_flight_update_runs_between_steps_and_returns_before_the_call_ends():
    lock = threading.Lock()
    gate = UpdateGate(lock, "in_flight")
    order: list[str] = []
    with lock:  # a generate call runs
        thread = _apply_in_thread(gate, lambda: order.append("load"))
        deadline = time.monotonic() + 10
        while not gate.pending() and time.monotonic() < deadline:
            time.sleep(0.001)
        order.append("step 1")
        jobs = gate.run_posted()  # the call's step boundary
        thread.join(timeout=10)
        assert not thread.is_alive()  # returned while the call still holds the engine
        order.append("step 2")
    assert order == ["step 1", "load", "step 2"] and len(jobs) == 1 and jobs[0].error is None


def test_in_flight_update_with_no_call_runs_at_once_and_errors_reach_the_caller():
    gate = UpdateGate(threading.Lock(), "in_flight")
    ran = []
    gate.apply(lambda: ran.append(1))
    assert ran == [1] and gate.timing.updates == 1 and not gate.pending()

    def broken():
        raise RuntimeError("load failed")

    with pytest.raises(RuntimeError, match="load failed"):
        gate.apply(broken)
    with pytest.raises(ValueError, match="drained"):
        gate.set_mode("halfway")


def test_transformers_engine_reports_its_drained_updates(tiny_text_model):
    from safetensors.torch import load_file

    from actors.engines import EngineConfig, create_engine

    engine = create_engine(EngineConfig(model=str(tiny_text_model), backend="transformers", max_model_len=256))
    try:
        state = load_file(str(next(tiny_text_model.glob("*.safetensors"))))
        name = next(n for n in state if "embed_tokens" in n)
        engine.update_weights(1, {name: state[name]})
        stats = engine.weight_update_stats()
        assert stats["weight_update_mode"] == "drained" and stats["weight_updates"] == 1
        assert stats["weight_update_idle_s"] > 0 and stats["weight_updates_mid_call"] == 0
    finally:
        engine.close()


def test_step_figures_report_engine_idle_per_update():
    """metrics.jsonl: each step's engine time lost to weight updates, all workers, differenced
    against the previous step like the other worker counters."""
    from types import SimpleNamespace

    from cluster.accounting import Finished, StepFigures
    from cluster.scheduler import StepDone
    from core.group_meta import EpisodeMeta, GroupMeta

    meta = GroupMeta("g", "a", 1, (EpisodeMeta("finished", True, 1.0, True, (3,)),))
    done = StepDone([Finished(meta, ("ref", 0), SimpleNamespace(index=0))], {"tokens": 1.0}, 4, 1.0, 2.0, 0.5, 4.0, {})
    figures = StepFigures()
    workers = [{"weight_updates": 2, "weight_update_idle_s": 0.5, "weight_update_reprefill_tokens": 30},
               {"weight_updates": 1, "weight_update_idle_s": 0.1}]
    first = figures.record(done, 5, workers, 4, 8.0, 2.0)
    assert first["engine_update_idle_s"] == pytest.approx(0.6)
    assert first["engine_update_idle_s_per_update"] == pytest.approx(0.2)
    assert first["engine_reprefill_tokens"] == 30
    workers[0].update(weight_updates=3, weight_update_idle_s=0.9)
    second = figures.record(done, 6, workers, 8, 16.0, 4.0)
    assert second["engine_update_idle_s"] == pytest.approx(0.4) and second["engine_update_idle_s_per_update"] == pytest.approx(0.4)
    assert second["engine_reprefill_tokens"] == 0
