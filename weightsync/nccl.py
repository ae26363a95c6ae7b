"""The NCCL strategy: learner rank 0 broadcasts bucketed weights into every vLLM worker.

Both halves live here because they must agree byte for byte on the bucket layout:

- `BucketLayout` packs the named parameters (Hugging Face names, cast to the engine dtype) into a
  few contiguous buffers of at most `bucket_bytes` each. It is computed once, when the group is
  formed, and travels to the engines as plain lists (msgpack-safe).
- `NcclWeightSender` (learner rank 0) and `NcclWeightReceiver` (one per vLLM worker) join one
  NCCL group through vLLM's `StatelessProcessGroup` + `PyNcclCommunicator` (a group separate from
  torch.distributed's default group, which the learner ranks and vLLM already use for themselves).
  The rendezvous address is the learner's node IP and a free port, passed through Ray by the
  driver: nothing is hard-coded.
- Every sync broadcasts a header first, [version, layout fingerprint], then the buckets: the
  version travels with the weights, and each receiver checks it against the version the driver
  announced (`NcclUpdate`) before anything is loaded.

Failure semantics: the receiver broadcasts into its own persistent bucket buffers, never into the
model, and waits for the last bucket with a deadline. Only when every bucket has arrived, and the
header says the announced version, are the weights handed to vLLM's loader and the version moved;
on a timeout the model keeps its previous weights and version, the communicator is marked broken
(NCCL cannot cancel an in-flight collective) and a `WeightSyncError` says so. The driver then
re-forms the group or stops. A version mismatch completes the collective (the group stays usable)
and is refused.

The strategy's ends: `NcclSender` (in the learner), `NcclReceiver` (beside the engine: it asks
the engine's worker processes to receive, through `EngineTarget.load_in_workers`; the vLLM worker
extension holds a `NcclWeightReceiver` there) and `NcclSync` (the driver).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch

from weightsync.base import Pending, WeightReceiver, WeightSender, WeightSync, WeightSyncError, WeightUpdate, log
from weightsync.object_store import ObjectStoreSync

@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    bucket: int
    offset: int  # in elements of the bucket's dtype
    numel: int


@dataclass(frozen=True)
class BucketLayout:
    """Where each named tensor lives inside the flat broadcast buckets (one dtype for all)."""

    dtype: str
    slots: tuple[TensorSlot, ...]
    bucket_numels: tuple[int, ...]

    @classmethod
    def build(
        cls, shapes: Iterable[tuple[str, Iterable[int]]], dtype: torch.dtype, bucket_bytes: int
    ) -> "BucketLayout":
        """Greedy packing in the given order; a tensor larger than a bucket gets a bucket alone."""
        elem = torch.empty((), dtype=dtype).element_size()
        cap = max(1, bucket_bytes // elem)
        slots: list[TensorSlot] = []
        numels: list[int] = [0]
        for name, shape in shapes:
            shape = tuple(int(s) for s in shape)
            n = 1
            for s in shape:
                n *= s
            if numels[-1] and numels[-1] + n > cap:
                numels.append(0)
            slots.append(TensorSlot(name, shape, len(numels) - 1, numels[-1], n))
            numels[-1] += n
        return cls(str(dtype).removeprefix("torch."), tuple(slots), tuple(numels))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_numels) * torch.empty((), dtype=self.torch_dtype).element_size()

    @functools.cached_property
    def fingerprint(self) -> int:
        """63 bits of a digest of the whole layout (fits an int64 header): both ends check they
        pack and unpack the same one."""
        digest = hashlib.sha256(json.dumps(self.to_wire(), sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def to_wire(self) -> dict:
        """Plain lists and strings: survives msgpack (vLLM's collective_rpc) and Ray."""
        return {
            "dtype": self.dtype,
            "slots": [[s.name, list(s.shape), s.bucket, s.offset, s.numel] for s in self.slots],
            "bucket_numels": list(self.bucket_numels),
        }

    @classmethod
    def from_wire(cls, wire: Mapping) -> "BucketLayout":
        slots = tuple(
            TensorSlot(name, tuple(shape), bucket, offset, numel)
            for name, shape, bucket, offset, numel in wire["slots"]
        )
        return cls(wire["dtype"], slots, tuple(wire["bucket_numels"]))

    def pack(self, named: Mapping[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Copies the named tensors into fresh flat buckets on `device` (cast to the layout dtype)."""
        buckets = [torch.empty(n, dtype=self.torch_dtype, device=device) for n in self.bucket_numels]
        self.pack_into(named, buckets)
        return buckets

    def pack_into(self, named: Mapping[str, torch.Tensor], buckets: list[torch.Tensor]) -> None:
        missing = [s.name for s in self.slots if s.name not in named]
        if missing:
            raise WeightSyncError(f"{len(missing)} tensors of the layout are missing, e.g. {missing[:3]}")
        for s in self.slots:
            t = named[s.name]
            if tuple(t.shape) != s.shape:
                raise WeightSyncError(f"{s.name}: shape {tuple(t.shape)} != layout {s.shape}")
            buckets[s.bucket][s.offset : s.offset + s.numel].copy_(t.detach().reshape(-1))

    def unpack(self, buckets: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Views into the buckets (no copy), named like the learner's parameters."""
        for s in self.slots:
            yield s.name, buckets[s.bucket][s.offset : s.offset + s.numel].view(s.shape)


def rendezvous_address() -> tuple[str, int]:
    """This node's IP (as Ray sees it, so other nodes can reach it) and a free TCP port."""
    try:
        import ray

        host = ray.util.get_node_ip_address()
    except Exception:  # outside Ray (a plain test): loopback
        host = "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return host, port


def _communicator(host: str, port: int, rank: int, world_size: int, device: torch.device,
                  timeout_s: float):
    # vLLM's stateless group: a TCPStore rendezvous plus a raw NCCL communicator, independent of
    # torch.distributed's default group. Same API in vLLM 0.24 (GPU) and 0.32.
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    try:
        pg = StatelessProcessGroup.create(
            host=host, port=port, rank=rank, world_size=world_size, store_timeout=int(timeout_s)
        )
    except TypeError:  # older signature without store_timeout
        pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(pg, device=device)


def _wait(event: torch.cuda.Event, deadline: float, what: str, comm=None) -> None:
    """NCCL collectives have no timeout of their own: poll the completion event against a deadline.

    On a timeout the communicator is aborted (`ncclCommAbort` ends its in-flight kernels, which
    would otherwise spin on the GPU for ever) and a `WeightSyncError` is raised.
    """
    while not event.query():
        if time.monotonic() > deadline:
            if comm is not None:
                try:
                    comm.nccl.ncclCommAbort(comm.comm)
                except Exception:  # best effort: the group is unusable either way
                    pass
            raise WeightSyncError(f"{what} did not complete before its timeout")
        time.sleep(0.0005)


class _NcclEnd:
    """What both ends share: the communicator, a stream of their own, persistent bucket buffers,
    and one deadline-bounded broadcast of every bucket. A timeout breaks the group for good."""

    def __init__(self, layout: BucketLayout, device: torch.device | str) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self._comm = None
        self._buckets: list[torch.Tensor] | None = None
        self._header: torch.Tensor | None = None
        self.broken = False

    def _connect(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        self._comm = _communicator(host, port, rank, world_size, self.device, timeout_s)
        # A stream of its own: a collective stuck on it never blocks the training or inference
        # stream of the process.
        self._stream = torch.cuda.Stream(self.device)
        # Persistent buckets: allocated once, refilled each sync (no allocator churn).
        self._buckets = [
            torch.empty(n, dtype=self.layout.torch_dtype, device=self.device)
            for n in self.layout.bucket_numels
        ]
        # [version, layout id]: broadcast ahead of the buckets, so the version travels with the
        # weights and a receiver can check it before anything is loaded.
        self._header = torch.zeros(2, dtype=torch.int64, device=self.device)

    def _check(self) -> None:
        if self._comm is None or self._buckets is None:
            raise WeightSyncError(f"{type(self).__name__} is not connected")
        if self.broken:
            raise WeightSyncError("weight-sync group is broken by an earlier timeout; re-form it")

    def _broadcast(self, timeout_s: float, what: str, header: bool = True) -> None:
        for b in ([self._header] if header else []) + self._buckets:
            self._comm.broadcast(b, src=0, stream=self._stream)
        done = torch.cuda.Event()
        done.record(self._stream)
        try:
            _wait(done, time.monotonic() + timeout_s, what, self._comm)
        except WeightSyncError:
            self.broken = True
            raise

    def probe(self, repeats: int = 3, timeout_s: float = 60.0) -> dict:
        """Raw link speed: broadcasts the buckets as they are (no pack, no load), best of
        `repeats`. Every end of the group must call `probe` with the same `repeats` at once."""
        self._check()
        nbytes = sum(b.numel() * b.element_size() for b in self._buckets)
        best = float("inf")
        for _ in range(repeats):
            self._stream.synchronize()
            t0 = time.perf_counter()
            self._broadcast(timeout_s, "NCCL probe broadcast", header=False)
            best = min(best, time.perf_counter() - t0)
        return {"bytes": nbytes, "seconds": best, "GBps": nbytes / best / 1e9}


class NcclWeightSender(_NcclEnd):
    """Learner rank 0's end: rank 0 of the weight-sync group, broadcasting bucket by bucket."""

    def __init__(self, layout: BucketLayout, device: torch.device | str = "cuda") -> None:
        super().__init__(layout, device)

    def connect(self, host: str, port: int, world_size: int, timeout_s: float = 300.0) -> None:
        """Blocks until every receiver has joined (call concurrently with the receivers')."""
        self._connect(host, port, 0, world_size, timeout_s)

    def send(self, named: Mapping[str, torch.Tensor], version: int, timeout_s: float = 60.0) -> dict:
        """Broadcasts one version (header, then buckets). Returns {"bytes", "pack_s", "send_s"}."""
        self._check()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.layout.pack_into(named, self._buckets)
            self._header.copy_(torch.tensor([int(version), self.layout.fingerprint], dtype=torch.int64))
        torch.cuda.current_stream(self.device).synchronize()
        t1 = time.perf_counter()
        self._broadcast(timeout_s, "NCCL weight broadcast (sender)")
        return {"bytes": self.layout.total_bytes, "pack_s": t1 - t0, "send_s": time.perf_counter() - t1}


class NcclWeightReceiver(_NcclEnd):
    """One vLLM worker's end. Receives into its own buckets; the caller loads the views."""

    def connect(self, host: str, port: int, rank: int, world_size: int,
                timeout_s: float = 300.0) -> None:
        self._connect(host, port, rank, world_size, timeout_s)

    def receive(self, version: int, timeout_s: float = 60.0) -> list[tuple[str, torch.Tensor]]:
        """Waits for the header and every bucket (or raises `WeightSyncError`), checks that they
        are `version` in this layout, then returns named views."""
        self._check()
        # The buckets may still be read by the previous load on the current stream.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        self._broadcast(timeout_s, "NCCL weight broadcast (receiver)")
        # The loader's copies run on the current stream: order them after the receive.
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        check_header(self._header.tolist(), version, self.layout)
        return list(self.layout.unpack(self._buckets))


def check_header(header: list[int], version: int, layout: BucketLayout) -> None:
    """Refuses a broadcast that is not `version` in `layout` (nothing is loaded then)."""
    got_version, got_layout = int(header[0]), int(header[1])
    if got_layout != layout.fingerprint:
        raise WeightSyncError("NCCL broadcast refused: the sender packed another bucket layout")
    if got_version != int(version):
        raise WeightSyncError(f"NCCL broadcast refused: it carries v{got_version}, the driver announced v{version}")


# --- the strategy's ends -------------------------------------------------------------------------


@dataclass(frozen=True)
class NcclUpdate(WeightUpdate):
    """A broadcast the driver announces to the sender and every receiver at once."""

    kind = "nccl"
    timeout_s: float = 60.0


class NcclSender(WeightSender):
    """Learner rank 0: fixes the layout once, joins the group, broadcasts each version."""

    _end: NcclWeightSender | None = None

    def setup(self, bucket_mb: float = 256.0, **_: Any) -> dict:
        """The layout and a rendezvous address: {"host", "port", "layout", "bytes"}."""
        named = self.source.on_device()
        layout = BucketLayout.build(((n, t.shape) for n, t in named.items()), self.source.dtype,
                                    int(bucket_mb * (1 << 20)))
        self._end = NcclWeightSender(layout, self.source.device)
        self._address = rendezvous_address()
        host, port = self._address
        return {"host": host, "port": port, "layout": layout.to_wire(), "bytes": layout.total_bytes}

    def _ready(self) -> NcclWeightSender:
        if self._end is None:
            raise WeightSyncError("NCCL sender used before setup")
        return self._end

    def connect(self, world_size: int, timeout_s: float = 300.0) -> None:
        host, port = self._address
        self._ready().connect(host, port, world_size, timeout_s)

    def send(self, update: WeightUpdate | None = None) -> NcclUpdate:
        """Broadcasts the current version. It goes out even when it is not the announced one, so
        the collective completes and the group stays usable; the receivers refuse it and so does
        this call, after the broadcast."""
        if not isinstance(update, NcclUpdate):
            raise WeightSyncError(f"NCCL sender needs the NcclUpdate the receivers got, not {update!r}")
        version = self.source.version()
        with torch.no_grad():
            stats = self._ready().send(self.source.on_device(), version, update.timeout_s)
        if version != update.version:
            raise WeightSyncError(f"the learner broadcast v{version}, but v{update.version} was announced")
        return dataclasses.replace(update, stats=stats)

    def probe(self, repeats: int = 3) -> dict:
        """Raw NCCL bandwidth of the group (every receiver probes concurrently)."""
        return self._ready().probe(repeats)


class NcclReceiver(WeightReceiver):
    """Beside the engine: its worker processes join the group and receive (see the vLLM worker
    extension's `bgrpo_nccl_*` methods); the engine moves its version when all of them loaded."""

    def connect(self, init: Mapping[str, Any]) -> None:
        """`init`: the sender's setup plus "rank" (this engine's first rank), "world_size" and
        "timeout_s". Each worker takes rank `rank + its tensor-parallel rank`."""
        timeout_s = float(init.get("timeout_s", 300.0))
        self.engine.call_workers("bgrpo_nccl_connect", (init["host"], init["port"], init["rank"],
                                 init["world_size"], init["layout"], timeout_s), timeout_s + 30)

    def receive(self, update: WeightUpdate) -> int:
        if not isinstance(update, NcclUpdate):
            raise WeightSyncError(f"NCCL receiver got a {type(update).__name__}")
        t0 = time.perf_counter()
        with self.lock:  # the broadcast lands in the workers' buffers, then loads: one step
            self.engine.load_in_workers(update.version, "bgrpo_nccl_receive",
                                        (update.version, update.timeout_s), update.timeout_s + 30)
            version = self.engine.policy_version
        self.last_stats = {"receive_load_s": time.perf_counter() - t0}
        return version

    def probe(self, repeats: int = 3) -> dict:
        return self.engine.call_workers("bgrpo_nccl_probe", (repeats,), 120)[0]


class NcclSync(WeightSync):
    """Driver side: forms the group once (`setup`); each sync announces the learner's version to
    the sender and every receiver, which run the broadcast together."""

    kind = "nccl"

    def setup(self) -> None:
        import ray

        bucket_mb = float(self.options.get("bucket_mb", 256.0))
        info = ray.get(self.sender.setup_weight_sync.remote(self.kind, bucket_mb=bucket_mb),
                       timeout=self.rpc_timeout_s)
        world = 1 + len(self.receivers)  # one vLLM worker per engine (no tensor parallelism here)
        ray.get([self.sender.connect_weight_sync.remote(self.kind, world)]
                + [r.connect_weight_sync.remote(self.kind, {**info, "rank": 1 + i, "world_size": world})
                   for i, r in enumerate(self.receivers)], timeout=self.rpc_timeout_s)
        self.info = info
        log.info("NCCL weight sync: %d ranks, %.2f GB per sync", world, info["bytes"] / 1e9)

    def send(self) -> Pending:
        import ray

        version = ray.get(self.sender.get_policy_version.remote(), timeout=self.rpc_timeout_s)
        update = NcclUpdate(version=version, timeout_s=self.timeout_s)
        sender_ref = self.sender.send_weights.remote(self.kind, update)
        return Pending(version, [r.receive_weights.remote(update) for r in self.receivers], sender_ref, update)

    def replace_receiver(self, index: int, receiver: Any) -> int:
        raise WeightSyncError("an NCCL receiver cannot be replaced: the group would have to be re-formed with every "
                              "receiver")

    def load_into(self, receivers) -> int:
        """Receivers outside the group (the evaluation worker) get the version through the object
        store, which needs no group."""
        return ObjectStoreSync(self.sender, receivers, self.timeout_s, self.rpc_timeout_s).sync()

    def probe(self, repeats: int = 3) -> dict:
        """Raw link speed of the group: the sender's measurement."""
        import ray

        return ray.get([self.sender.weight_sync_probe.remote(self.kind, repeats)]
                       + [r.weight_sync_probe.remote(self.kind, repeats) for r in self.receivers],
                       timeout=self.rpc_timeout_s)[0]
