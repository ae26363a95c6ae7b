"""The object-store strategy: one immutable Ray object per version, fetched by every engine.

Works everywhere (CPU included) and needs no group. A published version is ONE object: an
`ObjectStoreUpdate` holds the version and a single ObjectRef to a dict of every named CPU tensor,
so a receiver gets the whole version with one `ray.get` and can never load a mix of two versions;
a newer publish makes a new object and never touches an older one.

Tensors travel in a numpy wire format (`encode`/`decode`): Ray stores numpy arrays out of band
and hands them back as zero-copy views of the shared object store, while torch tensors go
through pickle (a full copy each way): 4-10x faster puts and free gets on a 0.8 GB update (see
bench/bench_weight_transport.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from weightsync.base import Pending, WeightReceiver, WeightSender, WeightSync, WeightSyncError, WeightUpdate

# --- the wire format ---------------------------------------------------------------------------

WIRE_FORMAT = "bgrpo-numpy-v1"
# numpy has no bfloat16: such tensors travel as their bits in a same-size integer type.
_BITS_VIEW = {torch.bfloat16: torch.int16}


def encode(named: Mapping[str, torch.Tensor]) -> dict:
    """Named CPU tensors -> numpy arrays (zero-copy views) for `ray.put`."""
    tensors = {}
    for name, t in named.items():
        t = t.detach().contiguous()
        view = t.view(_BITS_VIEW[t.dtype]) if t.dtype in _BITS_VIEW else t
        tensors[name] = (str(t.dtype).removeprefix("torch."), view.numpy())
    return {"format": WIRE_FORMAT, "tensors": tensors}


def decode(weights: Mapping) -> dict[str, torch.Tensor]:
    """The inverse of `encode`; plain {name: tensor} mappings pass through (as a new dict).

    Decoded tensors may share read-only object-store memory: consumers copy from them and never
    write into them.
    """
    if not (isinstance(weights, Mapping) and weights.get("format") == WIRE_FORMAT):
        return dict(weights)
    import warnings

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable": read-only by design
        for name, (dtype, array) in weights["tensors"].items():
            t = torch.from_numpy(array)
            want = getattr(torch, dtype)
            out[name] = t.view(want) if t.dtype != want else t
    return out


# --- the message ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectStoreUpdate(WeightUpdate):
    """One published version. `ref` resolves (ray.get) to the encoded named-tensor dict."""

    kind = "object_store"
    ref: Any = None
    num_tensors: int = 0
    num_bytes: int = 0
    dtype: str = ""

    def fetch(self, timeout_s: float = 300.0) -> dict[str, torch.Tensor]:
        """The receiver's side: every tensor of exactly this version, or a timeout error."""
        import ray

        return decode(ray.get(self.ref, timeout=timeout_s))


# --- the ends ------------------------------------------------------------------------------------


class ObjectStoreSender(WeightSender):
    """Puts the whole dict in the Ray object store as one object per version.

    Keeps a reference to the latest `keep` versions only, so older objects can be freed by Ray
    once every receiver has dropped them too.
    """

    def __init__(self, source=None, keep: int = 2) -> None:
        super().__init__(source)
        self.keep = max(1, keep)
        self._updates: list[ObjectStoreUpdate] = []
        self.last_publish_s = 0.0

    def send(self, update: WeightUpdate | None = None) -> ObjectStoreUpdate:
        """The source's current version, published once per version: a step the learner skipped
        (e.g. all groups filtered) keeps the version, and its update is handed out again."""
        version = self.source.version()
        if self._updates and self._updates[-1].version == version:
            return self._updates[-1]
        return self.publish(version, self.source.cpu())

    def publish(self, version: int, named: Mapping[str, torch.Tensor]) -> ObjectStoreUpdate:
        """Publishes `named` (HF names, CPU tensors) as `version`; versions only increase."""
        import ray

        if self._updates and version <= self._updates[-1].version:
            raise ValueError(f"weight versions must increase: {version} after {self._updates[-1].version}")
        t0 = time.perf_counter()
        tensors = dict(named)
        ref = ray.put(encode(tensors))
        dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
        self.last_publish_s = time.perf_counter() - t0
        update = ObjectStoreUpdate(
            version=version,
            ref=ref,
            num_tensors=len(tensors),
            num_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
            dtype=",".join(sorted(dtypes)),
            stats={"publish_s": self.last_publish_s},
        )
        self._updates = (self._updates + [update])[-self.keep:]
        return update


class ObjectStoreReceiver(WeightReceiver):
    """Fetches the version's one object and loads it through the engine's `update_weights`."""

    def receive(self, update: WeightUpdate) -> int:
        if not isinstance(update, ObjectStoreUpdate):
            raise WeightSyncError(f"object-store receiver got a {type(update).__name__}")
        t0 = time.perf_counter()
        weights = update.fetch()
        t1 = time.perf_counter()
        with self.lock:
            self.engine.update_weights(update.version, weights)
            version = self.engine.policy_version
        self.last_stats = {"fetch_s": t1 - t0, "load_s": time.perf_counter() - t1}
        return version


class ObjectStoreSync(WeightSync):
    """Driver side: the learner publishes (once per version), then every receiver fetches."""

    kind = "object_store"

    def send(self) -> Pending:
        import ray

        update = ray.get(self.sender.send_weights.remote(self.kind), timeout=self.rpc_timeout_s)
        return Pending(update.version, [r.receive_weights.remote(update) for r in self.receivers], update=update)

    def load_into(self, receivers) -> int:
        return ObjectStoreSync(self.sender, receivers, self.timeout_s, self.rpc_timeout_s).sync()
