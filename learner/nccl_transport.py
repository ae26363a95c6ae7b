"""NCCL weight transport: learner rank 0 broadcasts bucketed weights into every vLLM worker.

Both halves live here because they must agree byte for byte on the bucket layout:

- `BucketLayout` packs the named parameters (Hugging Face names, cast to the engine dtype) into a
  few contiguous buffers of at most `bucket_bytes` each. It is computed once, when the group is
  formed, and travels to the engines as plain lists (msgpack-safe), so a sync carries only the
  version number.
- `NcclWeightSender` (learner rank 0) and `NcclWeightReceiver` (one per vLLM worker) join one
  NCCL group through vLLM's `StatelessProcessGroup` + `PyNcclCommunicator` (a group separate from
  torch.distributed's default group, which the learner ranks and vLLM already use for themselves).
  The rendezvous address is the learner's node IP and a free port, passed through Ray by the
  driver: nothing is hard-coded.

Failure semantics: the receiver broadcasts into its own persistent bucket buffers, never into the
model, and waits for the last bucket with a deadline. Only when every bucket has arrived are the
weights handed to vLLM's loader and the version moved; on a timeout the model keeps its previous
weights and version, the communicator is marked broken (NCCL cannot cancel an in-flight
collective) and a `WeightSyncError` says so. The driver then re-forms the group or stops.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch


class WeightSyncError(RuntimeError):
    """A weight sync failed or timed out; receivers kept their previous weights and version."""


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

    def _check(self) -> None:
        if self._comm is None or self._buckets is None:
            raise WeightSyncError(f"{type(self).__name__} is not connected")
        if self.broken:
            raise WeightSyncError("weight-sync group is broken by an earlier timeout; re-form it")

    def _broadcast(self, timeout_s: float, what: str) -> None:
        for b in self._buckets:
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
            self._broadcast(timeout_s, "NCCL probe broadcast")
            best = min(best, time.perf_counter() - t0)
        return {"bytes": nbytes, "seconds": best, "GBps": nbytes / best / 1e9}


class NcclWeightSender(_NcclEnd):
    """Learner rank 0's end: rank 0 of the weight-sync group, broadcasting bucket by bucket."""

    def __init__(self, layout: BucketLayout, device: torch.device | str = "cuda") -> None:
        super().__init__(layout, device)

    def connect(self, host: str, port: int, world_size: int, timeout_s: float = 300.0) -> None:
        """Blocks until every receiver has joined (call concurrently with the receivers')."""
        self._connect(host, port, 0, world_size, timeout_s)

    def send(self, named: Mapping[str, torch.Tensor], timeout_s: float = 60.0) -> dict:
        """Broadcasts one version. Returns {"bytes", "pack_s", "send_s"}."""
        self._check()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.layout.pack_into(named, self._buckets)
        torch.cuda.current_stream(self.device).synchronize()
        t1 = time.perf_counter()
        self._broadcast(timeout_s, "NCCL weight broadcast (sender)")
        return {"bytes": self.layout.total_bytes, "pack_s": t1 - t0, "send_s": time.perf_counter() - t1}


class NcclWeightReceiver(_NcclEnd):
    """One vLLM worker's end. Receives into its own buckets; the caller loads the views."""

    def connect(self, host: str, port: int, rank: int, world_size: int,
                timeout_s: float = 300.0) -> None:
        self._connect(host, port, rank, world_size, timeout_s)

    def receive(self, timeout_s: float = 60.0) -> list[tuple[str, torch.Tensor]]:
        """Waits for every bucket (or raises `WeightSyncError`), then returns named views."""
        self._check()
        # The buckets may still be read by the previous load on the current stream.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        self._broadcast(timeout_s, "NCCL weight broadcast (receiver)")
        # The loader's copies run on the current stream: order them after the receive.
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return list(self.layout.unpack(self._buckets))
