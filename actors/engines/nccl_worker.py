"""The vLLM-worker half of the NCCL weight transport (mixed into the worker extension).

Each vLLM worker (one per tensor-parallel rank) joins the learner's weight-sync group as rank
`rank_offset + worker rank`, receives every bucket into its own buffers, and only then loads the
named views through `vllm_worker_ext.load_named_tensors`, the one function every transport ends
in. A timed-out receive therefore leaves the model as it was (see learner/nccl_transport.py).
"""

from __future__ import annotations

import hashlib

import torch


class NcclReceiverExtension:
    """Methods called through `LLM.collective_rpc("bgrpo_nccl_...")`; `self` is the vLLM worker."""

    def bgrpo_nccl_connect(self, host: str, port: int, rank_offset: int, world_size: int,
                           layout: dict, timeout_s: float) -> int:
        from learner.nccl_transport import BucketLayout, NcclWeightReceiver

        rank = rank_offset + int(getattr(self, "rank", 0))
        device = torch.device("cuda", torch.cuda.current_device())
        receiver = NcclWeightReceiver(BucketLayout.from_wire(layout), device)
        receiver.connect(host, port, rank, world_size, timeout_s)
        self._bgrpo_receiver = receiver
        return rank

    def bgrpo_nccl_receive(self, timeout_s: float, skip_names: list[str]) -> int:
        from actors.engines.vllm_worker_ext import load_named_tensors

        receiver = getattr(self, "_bgrpo_receiver", None)
        if receiver is None:
            raise RuntimeError("bgrpo_nccl_receive before bgrpo_nccl_connect")
        skip = set(skip_names)
        named = [(n, t) for n, t in receiver.receive(timeout_s) if n not in skip]
        return load_named_tensors(self, named)

    def bgrpo_nccl_probe(self, repeats: int) -> dict:
        return self._bgrpo_receiver.probe(repeats)

    def bgrpo_weight_digest(self) -> dict[str, str]:
        """sha256 of every parameter's bytes (vLLM names): bitwise comparisons in tests."""
        from actors.engines.vllm_worker_ext import _model

        out = {}
        for name, p in _model(self).named_parameters():
            data = p.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
            out[name] = hashlib.sha256(data.tobytes()).hexdigest()
        return out
