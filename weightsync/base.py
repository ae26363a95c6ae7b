"""The interface every weight-sync strategy implements, and the registry that picks one by name.

Three ends, one per place a sync touches:

- `WeightSender`, on learner rank 0: reads the learner's weights through a `WeightSource` (the
  learner plugs its model in) and sends one version;
- `WeightReceiver`, beside each inference engine: receives one version and loads it through the
  engine (the engine plugs in; see `EngineTarget`), returning the version now loaded;
- `WeightSync`, in the driver: built once from the config and the actor handles, it makes ONE
  call per sync (`send` then `wait`, or `sync`), whatever the transport.

A `WeightUpdate` is the message of one sync. It always carries the version, and its `kind` names
the strategy whose receiver takes it, so an engine host holding several receivers (a training
worker in the NCCL group that is also sent object-store updates) picks by the message. The
registry that maps strategy names to their ends is weightsync/registry.py.

This package imports neither role: the roles import it and plug themselves in.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

log = logging.getLogger("bgrpo.weightsync")

RPC_TIMEOUT_S = 600.0
"""Driver-side bound on one control call (asking a version, publishing, a whole sync)."""


class WeightSyncError(RuntimeError):
    """A weight sync failed, timed out or was refused; receivers kept their previous weights and
    version."""


@dataclass(frozen=True)
class WeightUpdate:
    """One version on its way to the engines. Subclasses add what their transport needs."""

    kind: ClassVar[str] = ""
    version: int
    stats: dict = field(default_factory=dict, compare=False)
    """What the sending end measured (seconds, bytes): benchmarks read it."""


@dataclass(frozen=True)
class WeightSource:
    """The learner's side of the plug: how a sender reads the weights it sends.

    Names are the Hugging Face checkpoint names (what `save_pretrained` writes), so every engine's
    loader accepts them.
    """

    cpu: Callable[[], Mapping[str, torch.Tensor]]
    """Detached CPU tensors in `dtype` (the object store sends these)."""
    on_device: Callable[[], Mapping[str, torch.Tensor]]
    """The parameters where they live, any float dtype (NCCL casts them while packing)."""
    version: Callable[[], int]
    """The version of those weights."""
    dtype: torch.dtype
    device: torch.device


class EngineTarget(abc.ABC):
    """The engine's side of the plug: what a receiver loads through. `actors.engine.InferenceEngine`
    implements it; every method is part of the interface (no capability probing)."""

    @property
    @abc.abstractmethod
    def policy_version(self) -> int:
        """Version of the weights loaded now."""

    @abc.abstractmethod
    def update_weights(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Loads named CPU tensors as `version`: all of them, or none and an error."""

    def call_workers(self, method: str, args: tuple, timeout_s: float) -> list:
        """Runs `method` of the weight-sync worker extension in every process that holds the model
        (vLLM's workers); one result per process. Engines whose model lives in their own process
        have no such processes."""
        raise WeightSyncError(f"{type(self).__name__} has no worker processes to receive weights in")

    def load_in_workers(self, version: int, method: str, args: tuple, timeout_s: float) -> None:
        """`call_workers(method, args)`, where `method` loads a version the workers received
        themselves; then `version` becomes the engine's. On an error the version stays."""
        raise WeightSyncError(f"{type(self).__name__} has no worker processes to receive weights in")


class WeightSender(abc.ABC):
    """Learner rank 0's end of one strategy."""

    def __init__(self, source: WeightSource) -> None:
        self.source = source

    def setup(self, **options: Any) -> dict:
        """Prepares the transport; returns what every receiver needs to join (plain data)."""
        return {}

    def connect(self, world_size: int, timeout_s: float) -> None:
        """Joins the receivers (called concurrently with theirs); nothing for pull transports."""

    @abc.abstractmethod
    def send(self, update: WeightUpdate | None = None) -> WeightUpdate:
        """Sends the source's current version. A push transport gets the update every receiver
        got from the driver and sends exactly that version; a pull transport makes the update."""

    def probe(self, repeats: int) -> dict:
        raise WeightSyncError(f"{type(self).__name__} has no link to probe")

    def close(self) -> None:
        """Frees transport resources."""


class WeightReceiver(abc.ABC):
    """One engine's end of one strategy."""

    def __init__(self, engine: EngineTarget, lock: Any = None) -> None:
        self.engine = engine
        self.lock = lock if lock is not None else contextlib.nullcontext()
        """Held around the load only (not a fetch): the engine host's lock between generate
        calls and weight loads."""
        self.last_stats: dict = {}

    def connect(self, init: Mapping[str, Any]) -> None:
        """Joins the sender with what its `setup` returned (plus this receiver's rank)."""

    @abc.abstractmethod
    def receive(self, update: WeightUpdate) -> int:
        """Loads `update` into the engine; returns the engine's version afterwards."""

    def probe(self, repeats: int) -> dict:
        raise WeightSyncError(f"{type(self).__name__} has no link to probe")


@dataclass
class Pending:
    """A sync in flight: the version sent, one ref per receiver resolving to the version it
    loaded, and (push transports) the sender's ref, resolving to the update with its stats."""

    version: int
    receiver_refs: list
    """None where the receiver was replaced after the send (`WeightSync.replace_receiver`)."""
    sender_ref: Any = None
    update: WeightUpdate | None = None
    """The message the receivers got."""


class WeightSync(abc.ABC):
    """The driver's handle on weight sync: built once (`make_weight_sync`), then one call per sync.

    `sender` is learner rank 0's actor handle, `receivers` the engine hosts' (they expose
    `setup_weight_sync`/`connect_weight_sync`/`send_weights`/`get_policy_version` and
    `connect_weight_sync`/`receive_weights` respectively, see the roles).
    """

    kind: ClassVar[str] = ""

    def __init__(self, sender: Any, receivers: Sequence[Any], timeout_s: float,
                 rpc_timeout_s: float = RPC_TIMEOUT_S, **options: Any) -> None:
        self.sender = sender
        self.receivers = list(receivers)
        self.timeout_s = float(timeout_s)
        self.rpc_timeout_s = float(rpc_timeout_s)
        self.options = options

    def setup(self) -> None:
        """Forms the group, once, before the first sync (nothing for pull transports)."""

    @abc.abstractmethod
    def send(self) -> Pending:
        """Starts sending the learner's current version to every receiver, without waiting."""

    def wait(self, pending: Pending | None) -> int | None:
        """Waits for `send` to finish everywhere and returns the version every receiver loaded.

        The sender's error comes first: when the sender's side of a push fails, the receivers'
        time out, and the sender's error, the cause, is the one raised. ray.get of a list raises
        whichever error arrives first (a receiver's may come sooner), so every ref is waited for
        and the sender's is read first. A receiver reporting another version raises.
        """
        import ray

        if pending is None:
            return None
        deadline = time.monotonic() + self.rpc_timeout_s
        receiver_refs = [r for r in pending.receiver_refs if r is not None]
        if pending.sender_ref is not None:
            refs = [pending.sender_ref, *receiver_refs]
            ray.wait(refs, num_returns=len(refs), timeout=self.rpc_timeout_s)
            ray.get(pending.sender_ref, timeout=max(0.0, deadline - time.monotonic()))
        versions = ray.get(receiver_refs, timeout=max(0.0, deadline - time.monotonic()))
        if any(v != pending.version for v in versions):
            raise WeightSyncError(f"workers loaded versions {versions}, expected {pending.version}")
        return pending.version

    def sync(self) -> int:
        """`send` then `wait`: every receiver has the learner's current version on return."""
        return self.wait(self.send())

    def replace_receiver(self, index: int, receiver: Any) -> int:
        """Receiver `index` is replaced by a new actor (a restarted rollout worker): later syncs
        go to it, and it loads the learner's current version now; returns that version. A
        strategy whose receivers form a group with the sender (NCCL) refuses."""
        self.receivers[index] = receiver
        return self.load_into([receiver])

    @abc.abstractmethod
    def load_into(self, receivers: Sequence[Any]) -> int:
        """The learner's current version into receivers outside the sync group (the evaluation
        worker), loaded before this returns; returns that version."""
