"""vLLM worker extension (`worker_extension_cls`): loads new weights inside vLLM's worker processes.

vLLM mixes this class into its worker, so `self` is the worker (`self.model_runner` holds the
model). Method names carry a `bgrpo_` prefix because vLLM refuses an extension that shadows a
worker attribute. Arguments cross vLLM's msgpack IPC, where a torch.Tensor loses its data, so the
object-store path hands over the path and layout of the engine's shared-memory staging file
(actors/engines/shm_staging.py) instead.

`load_named_tensors` is the one function that puts Hugging Face-named tensors into the model; any
transport (this file path, a NCCL receive on GPU) ends there.
"""

from __future__ import annotations

from typing import Iterable

import torch

from actors.engines.nccl_worker import NcclReceiverExtension


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


class BgrpoWorkerExtension(NcclReceiverExtension):
    """Weight loading entry points, called through `LLM.collective_rpc("bgrpo_...")`."""

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
