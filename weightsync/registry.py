"""Strategy name (`cluster.weight_sync`) -> its three ends, and the per-role holders of ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from weightsync.base import EngineTarget, WeightReceiver, WeightSender, WeightSource, WeightSync, WeightUpdate
from weightsync.nccl import NcclReceiver, NcclSender, NcclSync
from weightsync.object_store import ObjectStoreReceiver, ObjectStoreSender, ObjectStoreSync


@dataclass(frozen=True)
class Strategy:
    name: str
    sender: type[WeightSender]
    receiver: type[WeightReceiver]
    sync: type[WeightSync]


STRATEGIES = {
    "object_store": Strategy("object_store", ObjectStoreSender, ObjectStoreReceiver, ObjectStoreSync),
    "nccl": Strategy("nccl", NcclSender, NcclReceiver, NcclSync),
}


def strategy(name: str) -> Strategy:
    """The strategy `cluster.weight_sync` names."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown weight-sync strategy {name!r} (known: {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def make_weight_sync(kind: str, sender: Any, receivers: Sequence[Any], timeout_s: float,
                     **options: Any) -> WeightSync:
    """The driver's `WeightSync` for strategy `kind` (options: NCCL's `bucket_mb`)."""
    return strategy(kind).sync(sender, receivers, timeout_s, **options)


class Senders:
    """Learner rank 0's senders, one per strategy, built on first use from its `WeightSource`."""

    def __init__(self, source: WeightSource) -> None:
        self.source = source
        self._senders: dict[str, WeightSender] = {}

    def get(self, kind: str) -> WeightSender:
        if kind not in self._senders:
            self._senders[kind] = strategy(kind).sender(self.source)
        return self._senders[kind]

    def close(self) -> None:
        for s in self._senders.values():
            s.close()
        self._senders.clear()


class Receivers:
    """An engine's receivers, one per strategy, built on first use; an update goes to the
    receiver of its `kind`. `lock` (the host's generate-vs-load lock) is held around loads."""

    def __init__(self, engine: EngineTarget, lock: Any = None) -> None:
        self.engine = engine
        self.lock = lock
        self._receivers: dict[str, WeightReceiver] = {}

    def get(self, kind: str) -> WeightReceiver:
        if kind not in self._receivers:
            self._receivers[kind] = strategy(kind).receiver(self.engine, self.lock)
        return self._receivers[kind]

    def connect(self, kind: str, init: Mapping[str, Any]) -> None:
        self.get(kind).connect(init)

    def receive(self, update: WeightUpdate) -> int:
        return self.get(update.kind).receive(update)
