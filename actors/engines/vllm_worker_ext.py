"""vLLM worker extension (`worker_extension_cls`): loads new weights inside vLLM's worker processes.

vLLM mixes this class into its worker, so `self` is the worker (`self.model_runner` holds the
model). Method names carry a `bgrpo_` prefix because vLLM refuses an extension that shadows a
worker attribute. Arguments cross vLLM's msgpack IPC, where a torch.Tensor loses its data, so the
object-store path hands over the path and layout of the engine's shared-memory staging file
(actors/engines/shm_staging.py) instead.

`load_named_tensors` is the one function that puts Hugging Face-named tensors into the model; any
transport (this file path, a NCCL receive on GPU) ends there.

The NCCL half: each vLLM worker (one per tensor-parallel rank) joins the learner's weight-sync
group as rank `rank_offset + worker rank`, receives every bucket into its own buffers
(`weightsync.nccl.NcclWeightReceiver`, which also checks the broadcast's version header), and only
then loads the named views through `load_named_tensors`. A timed-out or refused receive therefore
leaves the model as it was.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def _model(worker) -> torch.nn.Module:
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def load_named_tensors(worker, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Loads (Hugging Face name, tensor) pairs into the worker's model; returns how many were given.

    vLLM's `model.load_weights` maps HF names to its own (q/k/v -> qkv_proj, gate/up ->
    gate_up_proj) and copies into the parameters. On the CPU backend that is not enough: it repacks
    linear layers into a kernel format after loading (the original parameters become empty), so
    plain `load_weights` fails; its in-place reload path re-materialises and repacks each layer.
    The packed copy of a tied output layer (it shares the input embedding's weight) is refreshed
    by running the embedding modules' post-load processing again.
    """
    from vllm.platforms import current_platform

    count = 0

    def counted():
        # Lazily: on GPU each tensor is copied to the device only when vLLM takes it, so a whole
        # update never sits in GPU memory twice.
        nonlocal count
        for item in named_tensors:
            count += 1
            yield item

    model = _model(worker)
    if current_platform.is_cpu():
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        worker.model_runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        for module in model.modules():
            if isinstance(module, VocabParallelEmbedding):
                module.quant_method.process_weights_after_loading(module)
    else:
        model.load_weights(weights=counted())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the staging file may be rewritten once we return
    return count


class BgrpoWorkerExtension:
    """Weight loading entry points, called through `LLM.collective_rpc("bgrpo_...")`; `self` is
    the vLLM worker."""

    def bgrpo_load_weights_shm(self, path: str, layout: list) -> int:
        """Loads every tensor of the engine's staging file (HF names); returns the count. The file
        is mapped (and on CUDA page-locked) once and reused by every later update."""
        from vllm.platforms import current_platform

        from actors.engines.shm_staging import StagingReader

        reader = getattr(self, "_bgrpo_staging", None)
        if reader is None or reader.file.path != path:
            if reader is not None:
                reader.close()
            device = torch.device("cpu") if current_platform.is_cpu() else torch.device("cuda", torch.cuda.current_device())
            reader = self._bgrpo_staging = StagingReader(path, layout, device)
        return load_named_tensors(self, reader.tensors())

    def bgrpo_weight_checksum(self, contains: str = "") -> float:
        """Sum of |w| over the model's (vLLM-named) parameters whose name contains `contains` (tests)."""
        total = 0.0
        for name, param in _model(self).named_parameters():
            if contains in name and param.numel() > 0:
                total += float(param.detach().float().abs().sum())
        return total

    # --- NCCL (weightsync.nccl): the learner broadcasts, every worker receives, then loads ------

    def bgrpo_nccl_connect(self, host: str, port: int, rank_offset: int, world_size: int,
                           layout: dict, timeout_s: float) -> int:
        from weightsync.nccl import BucketLayout, NcclWeightReceiver

        if not torch.cuda.is_available():
            raise RuntimeError("NCCL weight sync needs CUDA; use the object-store path on CPU")
        rank = rank_offset + int(getattr(self, "rank", 0))
        device = torch.device("cuda", torch.cuda.current_device())
        receiver = NcclWeightReceiver(BucketLayout.from_wire(layout), device)
        receiver.connect(host, port, rank, world_size, timeout_s)
        self._bgrpo_receiver = receiver
        return rank

    def bgrpo_nccl_receive(self, version: int, timeout_s: float) -> int:
        """Receives one broadcast, checks it is `version`, loads it; returns the tensor count. The
        layout is the learner's save_pretrained names, where a tied output layer is absent."""
        receiver = getattr(self, "_bgrpo_receiver", None)
        if receiver is None:
            raise RuntimeError("bgrpo_nccl_receive before bgrpo_nccl_connect")
        return load_named_tensors(self, receiver.receive(version, timeout_s))

    def bgrpo_nccl_probe(self, repeats: int) -> dict:
        return self._bgrpo_receiver.probe(repeats)

    def bgrpo_weight_digest(self) -> dict[str, str]:
        """sha256 of every parameter's bytes (vLLM names): bitwise comparisons in tests."""
        out = {}
        for name, p in _model(self).named_parameters():
            data = p.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
            out[name] = hashlib.sha256(data.tobytes()).hexdigest()
        return out
