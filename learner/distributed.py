"""torch.distributed for the learner ranks: one code path for 1 or N ranks.

Data parallelism is DDP's: every rank holds the whole model, trains on its shard of the batch,
and gradients are summed across ranks once per optimizer step, after the last micro-batch (so
no `no_sync` bookkeeping and ranks may run different numbers of micro-batches). The sum (not the
mean) is right because each rank's loss is already divided by the WHOLE batch's normaliser
(learner/loss.py). Gradients travel in flat buckets (few collectives, like DDP's buckets).

Backends: gloo on CPU, nccl on GPU. Every collective runs under the process group's timeout.
With one rank nothing is initialised and every helper is a no-op.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Iterable

import torch
import torch.distributed as dist

GRAD_BUCKET_BYTES = 64 * 1024 * 1024


def free_address(host: str = "127.0.0.1") -> tuple[str, int]:
    """A host and free TCP port for rank 0's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def init_process_group(
    rank: int, world_size: int, master_addr: str, master_port: int, backend: str, timeout_s: float
) -> None:
    """Joins the learner group (blocks until every rank has joined or the timeout expires)."""
    if world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, min or max); no-op on one rank."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_reduce_gradients_(params: Iterable[torch.nn.Parameter]) -> None:
    """Sums the gradients of `params` over ranks, bucketed. A parameter without a gradient on
    this rank (no samples, or unused) takes part with zeros so every rank issues the same
    collectives."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= GRAD_BUCKET_BYTES:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str, rank: int) -> torch.device:
    """cpu, or the rank's GPU (Ray sets CUDA_VISIBLE_DEVICES to one GPU per actor: cuda:0)."""
    if device == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n == 0:
        raise RuntimeError("learner.device is cuda but no GPU is visible")
    local = int(os.environ.get("LOCAL_RANK", rank)) % n
    return torch.device("cuda", local)
