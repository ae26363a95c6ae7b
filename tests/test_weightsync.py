"""weightsync/: the one interface (driver `WeightSync`, learner `WeightSender`, engine
`WeightReceiver`) with both strategies, on CPU. The NCCL broadcast itself is a GPU test
(tests/gpu/test_gpu.py); here its ends run with the collective replaced, so what is checked is
the handshake: who is told which version, what is forwarded to the engine, what is refused."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from weightsync import (
    EngineTarget,
    Pending,
    Receivers,
    Senders,
    WeightSource,
    WeightSyncError,
    make_weight_sync,
    strategy,
)
from weightsync.nccl import BucketLayout, NcclReceiver, NcclSender, NcclUpdate
from weightsync.object_store import ObjectStoreUpdate


class _ToyEngine(EngineTarget):
    """An engine whose model lives in its own process: a dict of tensors."""

    def __init__(self, names_shapes: dict[str, tuple[int, ...]]) -> None:
        self.weights = {n: torch.zeros(s) for n, s in names_shapes.items()}
        self._version = -1

    @property
    def policy_version(self) -> int:
        return self._version

    def update_weights(self, version, weights):
        for name, t in weights.items():
            self.weights[name].copy_(t)
        self._version = version


class _ToyLearner:
    """Learner rank 0's side: a model, its version, and the senders it plugs the model into."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 3)
        self.version = 0
        self.senders = Senders(WeightSource(
            cpu=lambda: {n: p.detach().clone() for n, p in self.model.state_dict().items()},
            on_device=lambda: dict(self.model.state_dict()),
            version=lambda: self.version,
            dtype=torch.float32,
            device=torch.device("cpu"),
        ))

    def step(self) -> None:
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p))
        self.version += 1

    def get_policy_version(self) -> int:
        return self.version

    def send_weights(self, kind, update=None):
        return self.senders.get(kind).send(update)

    def weights(self) -> dict:
        return {n: t.clone() for n, t in self.model.state_dict().items()}


class _ToyHost:
    """An engine host: what RolloutWorker and EngineHost expose to the driver."""

    def __init__(self) -> None:
        self.engine = _ToyEngine({"weight": (3, 4), "bias": (3,)})
        self.receivers = Receivers(self.engine)

    def connect_weight_sync(self, kind, init):
        self.receivers.connect(kind, init)

    def receive_weights(self, update) -> int:
        return self.receivers.receive(update)

    def weights(self) -> dict:
        return {n: t.clone() for n, t in self.engine.weights.items()}


def test_object_store_strategy_end_to_end(ray_cluster):
    """Driver -> learner actor publishes -> every host actor fetches and loads: bitwise the
    learner's weights, the version with them; a skipped step publishes nothing new."""
    import ray

    learner = ray.remote(_ToyLearner).remote()
    hosts = [ray.remote(_ToyHost).remote() for _ in range(2)]
    sync = make_weight_sync("object_store", learner, hosts, timeout_s=30.0)
    sync.setup()  # nothing to form
    assert sync.sync() == 0
    first = ray.get(learner.send_weights.remote("object_store"))
    assert isinstance(first, ObjectStoreUpdate) and first.version == 0 and first.num_tensors == 2
    for expected in (1, 2):
        ray.get(learner.step.remote())
        pending = sync.send()  # async mode: send now, wait later
        assert pending.version == expected and sync.wait(pending) == expected
    want = ray.get(learner.weights.remote())
    for got in ray.get([h.weights.remote() for h in hosts]):
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    # Same version again (the learner skipped a step): the same object, not a new publish.
    again = sync.send()
    assert again.version == 2 and again.update.ref == ray.get(learner.send_weights.remote("object_store")).ref
    assert sync.wait(again) == 2
    # A receiver outside the group (the evaluation worker) gets the current version too.
    evaluator = ray.remote(_ToyHost).remote()
    assert sync.load_into([evaluator]) == 2
    got = ray.get(evaluator.weights.remote())
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert sync.wait(None) is None  # nothing in flight: nothing to wait for
    for a in [learner, *hosts, evaluator]:
        ray.kill(a)


def test_a_replaced_receiver_gets_the_current_version_and_later_syncs(ray_cluster):
    """A restarted rollout worker: its new actor takes the dead one's place in the receivers,
    loads the learner's current version at once, and a send made before the replacement no
    longer waits for the dead one (its ref is taken out, as `WeightSyncWiring` does)."""
    import ray

    learner = ray.remote(_ToyLearner).remote()
    hosts = [ray.remote(_ToyHost).remote() for _ in range(2)]
    sync = make_weight_sync("object_store", learner, hosts, timeout_s=30.0)
    assert sync.sync() == 0
    ray.get(learner.step.remote())
    pending = sync.send()
    ray.kill(hosts[1])
    replacement = ray.remote(_ToyHost).remote()
    assert sync.replace_receiver(1, replacement) == 1 and sync.receivers[1] is replacement
    pending.receiver_refs[1] = None
    assert sync.wait(pending) == 1
    ray.get(learner.step.remote())
    assert sync.sync() == 2
    want = ray.get(learner.weights.remote())
    got = ray.get(replacement.weights.remote())
    assert all(torch.equal(got[n], want[n]) for n in want)
    for a in [learner, hosts[0], replacement]:
        ray.kill(a)


def test_nccl_refuses_to_replace_a_receiver():
    sync = make_weight_sync("nccl", None, [object()], timeout_s=5.0)
    with pytest.raises(WeightSyncError, match="re-formed"):
        sync.replace_receiver(0, object())


def test_a_worker_reporting_another_version_raises(ray_cluster):
    import ray

    sync = make_weight_sync("object_store", None, [], timeout_s=5.0)
    with pytest.raises(WeightSyncError, match=r"workers loaded versions \[3, 2\], expected 3"):
        sync.wait(Pending(3, [ray.put(3), ray.put(2)]))


def test_the_senders_error_is_reported_before_the_receivers(ray_cluster):
    """When the sender fails, the receivers time out (sooner, here) with their own errors: the
    driver reports the sender's, the cause."""
    import ray

    @ray.remote
    def fail(message: str, delay: float) -> int:
        time.sleep(delay)
        raise WeightSyncError(message)

    sync = make_weight_sync("nccl", None, [], timeout_s=5.0)
    pending = Pending(1, [fail.remote("receiver timed out", 0.0)], sender_ref=fail.remote("sender broke", 1.0))
    with pytest.raises(Exception, match="sender broke"):
        sync.wait(pending)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown weight-sync strategy 'gloo'"):
        strategy("gloo")
    assert {strategy(k).sync.kind for k in ("object_store", "nccl")} == {"object_store", "nccl"}


def test_object_store_versions_only_increase(ray_cluster):
    learner = _ToyLearner()
    sender = learner.senders.get("object_store")
    sender.publish(4, learner.weights())
    with pytest.raises(ValueError, match="must increase: 4 after 4"):
        sender.publish(4, learner.weights())


# --- NCCL: the handshake around the collective -------------------------------------------------


class _FakeEnd:
    """Stands in for NcclWeightSender: records what would be broadcast."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict, int, float]] = []

    def send(self, named, version, timeout_s):
        self.sent.append((dict(named), version, timeout_s))
        return {"bytes": 1, "pack_s": 0.0, "send_s": 0.0}


def test_nccl_sender_sets_up_a_layout_and_broadcasts_its_own_version():
    learner = _ToyLearner()
    sender = learner.senders.get("nccl")
    assert isinstance(sender, NcclSender)
    with pytest.raises(WeightSyncError, match="before setup"):
        sender.send(NcclUpdate(version=0))
    init = sender.setup(bucket_mb=1e-5)  # ~10 bytes per bucket: one tensor per bucket
    layout = BucketLayout.from_wire(init["layout"])
    assert [s.name for s in layout.slots] == ["weight", "bias"] and len(layout.bucket_numels) == 2
    assert init["bytes"] == (12 + 3) * 4 and isinstance(init["port"], int) and init["host"]
    sender._end = end = _FakeEnd()
    with pytest.raises(WeightSyncError, match="NcclUpdate"):
        sender.send(None)  # a push needs the announced update
    learner.step()
    out = sender.send(NcclUpdate(version=1, timeout_s=7.0))
    assert out.version == 1 and out.stats["bytes"] == 1 and end.sent[-1][1:] == (1, 7.0)
    assert torch.equal(end.sent[-1][0]["weight"], learner.model.weight)
    # Announced v2 while the learner is at v1: the broadcast still goes out (the collective must
    # complete for the group to stay usable), carrying v1, and the sender refuses afterwards.
    with pytest.raises(WeightSyncError, match="broadcast v1, but v2 was announced"):
        sender.send(NcclUpdate(version=2, timeout_s=7.0))
    assert len(end.sent) == 2 and end.sent[-1][1] == 1


class _WorkerEngine(_ToyEngine):
    """An engine with worker processes (like vLLM): records what the receiver asks of them."""

    def __init__(self) -> None:
        super().__init__({"weight": (3, 4)})
        self.calls: list[tuple] = []
        self.fail = False
        self.lock = threading.Lock()
        self.locked_during_load: list[bool] = []

    def call_workers(self, method, args, timeout_s):
        self.calls.append(("call", method, args, timeout_s))
        return [{"GBps": 1.0}]

    def load_in_workers(self, version, method, args, timeout_s):
        self.calls.append(("load", method, args, timeout_s))
        self.locked_during_load.append(self.lock.locked())
        if self.fail:
            raise WeightSyncError("did not complete before its timeout")
        self._version = version


def test_nccl_receiver_forwards_the_handshake_to_the_engines_workers():
    engine = _WorkerEngine()
    receivers = Receivers(engine, engine.lock)  # the host's generate-vs-load lock
    init = {"host": "10.0.0.1", "port": 1234, "layout": {"x": 1}, "rank": 2, "world_size": 3, "timeout_s": 9.0}
    receivers.connect("nccl", init)
    assert engine.calls[-1] == ("call", "bgrpo_nccl_connect", ("10.0.0.1", 1234, 2, 3, {"x": 1}, 9.0), 39.0)
    assert receivers.receive(NcclUpdate(version=4, timeout_s=5.0)) == 4
    assert engine.calls[-1] == ("load", "bgrpo_nccl_receive", (4, 5.0), 35.0)  # the version goes to the workers
    engine.fail = True
    with pytest.raises(WeightSyncError, match="timeout"):
        receivers.receive(NcclUpdate(version=5, timeout_s=5.0))
    assert engine.policy_version == 4
    assert engine.locked_during_load == [True, True] and not engine.lock.locked()
    with pytest.raises(WeightSyncError, match="ObjectStoreUpdate"):
        NcclReceiver(engine).receive(ObjectStoreUpdate(version=6))
    assert receivers.get("nccl").probe(2) == {"GBps": 1.0}


def test_an_engine_without_worker_processes_refuses_nccl():
    """transformers' engine (the model in its own process) cannot join a broadcast: a clear error
    from the interface itself, no capability probing."""
    receivers = Receivers(_ToyEngine({"weight": (3, 4)}))
    with pytest.raises(WeightSyncError, match="no worker processes"):
        receivers.connect("nccl", {"host": "h", "port": 1, "layout": {}, "rank": 1, "world_size": 2})
    with pytest.raises(WeightSyncError, match="no worker processes"):
        receivers.receive(NcclUpdate(version=1))
