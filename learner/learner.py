"""The learner: GRPO steps on exact trajectories, versioned weight publishing, checkpoints.

`Learner` is a plain class (constructed directly in tests); `LearnerActor` at the bottom is the
Ray actor. Several ranks run the same code: construct one `Learner` per rank with
`world_size = N`, ask rank 0 for `rendezvous_address()`, call `connect(host, port)` on every rank
at once, then call `train_step(groups)` on every rank with the SAME groups (an ObjectRef, so
the batch is stored once): each rank computes the whole batch's advantages and loss
normalisers, trains on its shard, and gradients are summed across ranks (learner/distributed.py).

One `train_step`:
    groups -> advantages (per episode) -> samples (one per step) -> whole-batch normaliser
    -> this rank's shard -> micro-batches: forward, GRPO loss, backward (gradients accumulate)
    -> all-reduce gradients -> clip -> AdamW step  (x grpo.num_iterations, old logprobs from pass 1)
    -> scheduler step -> policy_version += 1
"""

from __future__ import annotations

import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from core.trajectory import TrajectoryGroup
from weightsync import Senders, WeightSource, WeightUpdate
from weightsync.nccl import rendezvous_address

from . import checkpoint as ckpt
from . import distributed as D
from .batching import (
    VisionSpec,
    batch_normalizer,
    build_samples,
    collate,
    micro_batches,
    shard,
    to_device,
)
from .config import LearnerConfig
from .logprobs import completion_logprobs, fp32_output_layer
from .loss import grpo_loss
from .vision import VISION_KWARGS, enable_packed_vision_attention, vision_precompute, vision_tower
from .weights import PinnedStaging, hf_named_tensors

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_path: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A text (CausalLM) or vision-language (ImageTextToText) model, float32 parameters."""
    from core.processor import is_vision_language
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if is_vision_language(model_path) else AutoModelForCausalLM
    return cls.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=attn_implementation
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rope_index_fn(model: torch.nn.Module):
    """The model's own multimodal position-id function (Qwen-VL's `get_rope_index`), if any."""
    for module in model.modules():
        if hasattr(module, "get_rope_index") and hasattr(module, "visual"):
            return module.get_rope_index
    return None


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each text decoder layer and vision block in place (per layer, as torchtitan
    does: identical layers share one compiled graph, and a graph break stays inside one layer).
    dynamic=True: micro-batches differ in length, and one graph must serve them all. Returns how
    many."""
    import torch._dynamo

    layers = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "VisionBlock"))]
    if not layers:
        raise ValueError(f"learner.compile: no decoder layers found in {type(model).__name__}")
    # One cache entry per layer object in the worst case: keep every layer compiled.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


class _StepSums:
    """The running float64 sums of one `train_step` on this rank (all passes), kept on the device
    so no micro-batch waits for a GPU -> CPU copy; summed over ranks once, at the end."""

    KEYS = (
        "loss", "tokens", "kl", "entropy", "clip_low", "clip_high", "clip_region",
        "is_ratio", "is_masked", "prompt_tokens", "staleness", "outside_filter",
        "token_lag", "lag_tokens",
    )

    def __init__(self, device: torch.device) -> None:
        f64 = torch.float64
        self.sums = {k: torch.zeros((), dtype=f64, device=device) for k in self.KEYS}
        self.is_min = torch.tensor(math.inf, dtype=f64, device=device)
        self.is_max = torch.tensor(-math.inf, dtype=f64, device=device)
        self.lag_max = 0.0  # a host number: the lags are known on the host

    def add(self, loss: torch.Tensor, stats: Any, entropies: torch.Tensor, mask: torch.Tensor,
            outside: torch.Tensor, completion_mask: torch.Tensor, mb: list, policy_version: int) -> None:
        """One micro-batch: `stats` from `grpo_loss`, `mask` the trained tokens, `outside` the
        sampled tokens the current top-k/top-p excludes."""
        f64, sums = torch.float64, self.sums
        sums["loss"] += loss.detach().to(f64)
        for k in ("tokens", "kl", "clip_low", "clip_high", "clip_region", "is_ratio", "is_masked"):
            sums[k] += getattr(stats, k).to(f64)
        sums["entropy"] += (entropies * mask).sum().to(f64)
        sums["outside_filter"] += (outside * completion_mask).sum().to(f64)
        sums["prompt_tokens"] += float(sum(len(x.prompt_ids) for x in mb))
        sums["staleness"] += float(sum(policy_version - x.policy_version for x in mb))
        # Per token: with in-flight weight updates the tokens of one sample can differ in version.
        lags = [lag for x in mb for lag in x.token_lags(policy_version)]
        sums["token_lag"] += float(sum(lags))
        sums["lag_tokens"] += float(len(lags))
        self.lag_max = max(self.lag_max, float(max(lags, default=0)))
        self.is_min = torch.minimum(self.is_min, stats.is_ratio_min.to(f64))
        self.is_max = torch.maximum(self.is_max, stats.is_ratio_max.to(f64))

    def reduce(self, passes: int) -> dict[str, float]:
        """The whole batch's totals (every rank gets the same): per-batch counts are divided by
        the number of passes (each pass sees the batch once), token sums are not (the token
        means divide by all passes' tokens), plus "is_min"/"is_max" over every token."""
        keys = list(self.sums)
        packed = D.all_reduce_(torch.stack([self.sums[k] for k in keys]), "sum")
        total = dict(zip(keys, packed.tolist()))
        for k in ("loss", "prompt_tokens", "staleness", "outside_filter", "token_lag", "lag_tokens"):
            total[k] /= passes
        total["lag_max"] = D.all_reduce_(torch.tensor(self.lag_max, dtype=torch.float64, device=self.is_max.device),
                                         "max").item()
        total["is_min"] = D.all_reduce_(self.is_min, "min").item()
        total["is_max"] = D.all_reduce_(self.is_max, "max").item()
        return total


class _MicroBatchFeed:
    """This rank's micro-batches on the device, pass after pass. In the first pass, collation
    (image processing on the CPU) of micro-batch i+1 runs in a thread while the model works on
    micro-batch i (PIL and numpy release the GIL for most of it); with several passes
    (num_iterations > 1) the first pass's CPU batches are kept and reused."""

    def __init__(self, prepare, chunks: list[list], keep: bool, device: torch.device) -> None:
        self.prepare, self.chunks, self.keep, self.device = prepare, chunks, keep, device
        self.cpu_batches: list[dict] = []
        self.wait_s = 0.0  # time the training loop WAITED for collation (not collation's time)
        self._pool: ThreadPoolExecutor | None = None
        self._pending = None

    def start_pass(self, it: int, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._pending = pool.submit(self.prepare, self.chunks[0]) if self.chunks and it == 0 else None

    def get(self, it: int, i: int) -> dict[str, Any]:
        """Micro-batch `i` of pass `it`, on the device."""
        tc = time.perf_counter()
        if it == 0:
            cpu_batch = self._pending.result()
            nxt = i + 1 < len(self.chunks)
            self._pending = self._pool.submit(self.prepare, self.chunks[i + 1]) if nxt else None
            if self.keep:
                self.cpu_batches.append(cpu_batch)
        else:
            cpu_batch = self.cpu_batches[i]
        batch = to_device(cpu_batch, self.device)
        self.wait_s += time.perf_counter() - tc
        return batch


class Learner:
    """One learner rank. See the module docstring for the multi-rank protocol."""

    def __init__(
        self,
        config: LearnerConfig,
        rank: int = 0,
        world_size: int | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        """`model`: an already-built model to train instead of loading `config.model_path`'s
        weights (benchmarks of random-initialised shapes); the tokenizer and processor still
        come from `config.model_path`."""
        config.validate()
        self.config = config
        self.cfg = config.grpo
        self.rank = rank
        self.world_size = world_size if world_size is not None else config.num_ranks
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world_size {self.world_size}")
        self.device = D.local_device(config.device, rank)
        seed_everything(config.seed)

        self._build_model(model)
        # Frozen reference model, only when the KL term is on (TRL: beta == 0 loads none).
        self.ref_model = (
            self._load_reference_model() if self.cfg.beta != 0.0 and not config.lora.enabled else None
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = self._build_optimizer()
        self.autocast_dtype = _DTYPES[config.dtype]
        # Rank 0 sends the weights (ranks hold identical ones), one sender per strategy.
        self.weight_senders = Senders(WeightSource(
            cpu=self.get_weights,
            on_device=lambda: hf_named_tensors(self.model, to_cpu=False),
            version=lambda: self._policy_version,
            dtype=_DTYPES[config.publish_dtype],
            device=self.device,
        )) if rank == 0 else None
        self.step = 0
        self._policy_version = 0

    # --- setup helpers ---------------------------------------------------------------------

    def _build_model(self, model: torch.nn.Module | None) -> None:
        """The policy model on the device (+ LoRA, gradient checkpointing, compiled layers) and
        what `_prepare` needs of it (vision spec, placeholder tokens, pad token, rope index)."""
        config = self.config
        self.model = model if model is not None else load_model(
            config.model_path, config.attn_implementation
        )
        self.model.config.use_cache = False
        self.vision = self._vision_spec()
        self.placeholder_ids = {
            int(i) for i in (getattr(self.model.config, "image_token_id", None),
                             getattr(self.model.config, "video_token_id", None)) if i is not None
        } if self.vision is not None else set()
        self.pad_token_id = self._pad_token_id()
        self.fp32_logits = config.fp32_logits and fp32_output_layer(self.model)
        if config.lora.enabled:
            self.model = self._wrap_lora(self.model)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        # Qwen3-VL's vision tower: one attention call for all images, grid inputs from the CPU
        # (learner/vision.py says why); with sdpa only, other backends keep their own path.
        self.packed_vision_layers = (
            enable_packed_vision_attention(self.model)
            if config.packed_vision_attention and config.attn_implementation == "sdpa" else 0
        )
        self._vision_tower = vision_tower(self.model) if self.vision is not None else None
        self.model.to(self.device)
        self.model.train()
        self.compiled_layers = compile_layers(self.model) if config.compile else 0
        self._rope_index = _rope_index_fn(self.model) if self.vision is not None else None

    def _load_reference_model(self) -> torch.nn.Module:
        """A frozen copy of the initial model, computing its logits as the policy does."""
        ref = load_model(self.config.model_path, self.config.attn_implementation)
        if self.fp32_logits:
            fp32_output_layer(ref)
        if self.packed_vision_layers:
            enable_packed_vision_attention(ref)
        return ref.to(self.device).eval().requires_grad_(False)

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW over the trainable parameters and its learning-rate schedule."""
        from transformers import get_scheduler

        config = self.config
        optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            betas=tuple(config.adam_betas),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            # One fused kernel over all parameters on GPU (the 2B model's step is ~2x faster).
            fused=self.device.type == "cuda",
        )
        scheduler = get_scheduler(
            config.lr_schedule,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.total_steps,
        )
        return optimizer, scheduler

    def _vision_spec(self) -> VisionSpec | None:
        from core.processor import is_vision_language, load_processor

        if not is_vision_language(self.config.model_path):
            return None
        processor = load_processor(self.config.model_path)
        image_processor = processor.image_processor
        return VisionSpec(
            image_processor=image_processor,
            image_token_id=int(self.model.config.image_token_id),
            merge_size=int(getattr(image_processor, "merge_size", 2)),
        )

    def _pad_token_id(self) -> int:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.config.model_path)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError(f"{self.config.model_path}: tokenizer has neither pad nor eos token")
        return int(pad)

    def _wrap_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            import peft
        except ImportError:
            raise ImportError(
                "learner.lora.enabled needs peft: pip install 'bgrpo[peft]'"
            ) from None
        lc = self.config.lora
        return peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=lc.r,
                lora_alpha=lc.alpha,
                lora_dropout=lc.dropout,
                target_modules=list(lc.target_modules),
            ),
        )

    # --- distributed -------------------------------------------------------------------------

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's reachable address and a free port for `connect` (call on rank 0)."""
        try:
            import ray

            host = ray.util.get_node_ip_address()
        except Exception:  # outside Ray
            host = "127.0.0.1"
        return D.free_address(host)

    def connect(self, master_addr: str, master_port: int) -> None:
        """Joins the learner process group (call on every rank concurrently); then rank 0's
        parameters are broadcast so every rank starts identical, as DDP does."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        D.init_process_group(
            self.rank, self.world_size, master_addr, master_port, backend, self.config.dist_timeout_s
        )
        if D.is_distributed():
            import torch.distributed as dist

            with torch.no_grad():
                for p in self.model.parameters():
                    dist.broadcast(p.data, src=0)

    # --- forward ---------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self):
        if self.device.type == "cuda" and self.autocast_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return nullcontext()

    def _completion_logps(
        self, model: torch.nn.Module, batch: dict[str, Any], with_entropy: bool,
        filtered: bool | None = None, with_full: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per-token logprobs (B, T) of the completion tokens under the distribution each row was
        sampled from (learner/logprobs.py; `filtered` defaults to
        `grpo.score_with_sampling_filters`) and their entropies; with `with_full`, also the
        full-softmax logprobs at the temperature from the same forward (for the KL term)."""
        T = batch["logits_to_keep"]
        kwargs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            # T + 1: position P - 1 predicts the first completion token.
            "logits_to_keep": T + 1,
            "use_cache": False,
        }
        for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "position_ids", *VISION_KWARGS):
            if k in batch:
                kwargs[k] = batch[k]
        with self._autocast():
            logits = model(**kwargs).logits
        logits = logits[:, :-1, :]
        completion_ids = batch["input_ids"][:, -T:]
        settings = (batch["temperature"], batch["top_k"], batch["top_p"])
        if filtered is None:
            filtered = self.cfg.score_with_sampling_filters
        logps, entropies = completion_logprobs(
            logits, completion_ids, *settings, filtered=filtered, with_entropy=with_entropy
        )
        if not with_full:
            return logps, entropies
        full = logps if not filtered else completion_logprobs(
            logits, completion_ids, *settings, filtered=False
        )[0]
        return logps, entropies, full

    def _prepare(self, mb: list, mask_truncated: bool, image_cache: dict) -> dict[str, Any]:
        """Collates one micro-batch on the CPU with the model's extra inputs (runs in the
        collation thread during `train_step`)."""
        batch = collate(mb, self.pad_token_id, mask_truncated, self.vision, "cpu", image_cache)
        if self._rope_index is not None and "image_grid_thw" in batch and "mm_token_type_ids" in batch:
            # The model's own function, on CPU here in the collation thread: inside the forward
            # it walks the batch sample by sample with a GPU sync each time.
            batch["position_ids"] = self._rope_index(
                batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
            )[0]
        if self._vision_tower is not None and "image_grid_thw" in batch:
            batch.update(vision_precompute(self._vision_tower, batch["image_grid_thw"]))
        return batch

    # --- the GRPO step -----------------------------------------------------------------------

    def train_step(self, groups: list[TrajectoryGroup]) -> dict[str, float]:
        """One optimizer step on `groups` (the same list on every rank). Returns metrics of
        the whole batch (identical on every rank)."""
        t0 = time.perf_counter()
        samples, adv_stats, placeholder_steps = self._training_samples(groups)
        normalizer = batch_normalizer(samples, self.cfg)
        mine = shard(samples, self.rank, self.world_size)

        # --- forward/backward over micro-batches (gradients accumulate), num_iterations passes ---
        self.model.train()
        passes = self.cfg.num_iterations
        sums = _StepSums(self.device)
        image_cache: dict = {}
        feed = _MicroBatchFeed(
            lambda mb: self._prepare(mb, self.cfg.mask_truncated_completions, image_cache),
            micro_batches(mine, self.config.micro_batch_size), keep=passes > 1, device=self.device,
        )
        # num_iterations > 1 (TRL's mu): the first pass's logprobs are the "old" policy of every
        # later pass (per micro-batch).
        old_logps: list[torch.Tensor] = []
        for it in range(passes):
            self.optimizer.zero_grad(set_to_none=True)
            failure = self._forward_backward_pass(it, passes, feed, normalizer, old_logps, sums)
            self._stop_if_any_rank_failed(failure)
            t_opt, grad_norm, lr, stepped = self._clip_and_step(normalizer)
        self._end_batch(stepped)
        optimizer_s = time.perf_counter() - t_opt

        metrics = self._step_metrics(
            sums.reduce(passes), passes, normalizer, grad_norm, lr, stepped, placeholder_steps,
            times={"t0": t0, "t_opt": t_opt, "collate": feed.wait_s, "optimizer": optimizer_s},
        )
        metrics.update(adv_stats.as_metrics())
        if self.compiled_layers:
            # Graphs torch.compile has built so far in this process: a rise after the first steps
            # is a recompile (a new shape or input kind), which makes that step slow.
            from torch._dynamo.utils import counters

            metrics["compiled_graphs"] = float(counters["stats"]["unique_graphs"])
        return metrics

    def _training_samples(self, groups: list[TrajectoryGroup]) -> tuple[list, Any, int]:
        """One sample per trainable step, the batch's advantage statistics, and how many steps
        were dropped for holding an image/video placeholder token in their completion: such a
        completion cannot be re-run faithfully (transformers would try to put image features
        there, while the engine embedded it as plain text). Trained models practically never
        emit one; random ones do."""
        samples, adv_stats = build_samples(groups, self.cfg)
        placeholder_steps = 0
        if self.placeholder_ids:
            kept = [s for s in samples if not self.placeholder_ids.intersection(s.completion_ids)]
            placeholder_steps, samples = len(samples) - len(kept), kept
        return samples, adv_stats, placeholder_steps

    def _forward_backward_pass(
        self, it: int, passes: int, feed: _MicroBatchFeed, normalizer: Any,
        old_logps: list[torch.Tensor], sums: _StepSums,
    ) -> BaseException | None:
        """Pass `it` over this rank's micro-batches: forward, GRPO loss, backward (gradients
        accumulate). Returns the exception that stopped it (e.g. a BatchError on this rank's
        shard) instead of raising, so every rank can first learn that one failed."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate")
        try:
            feed.start_pass(it, pool)
            for i, mb in enumerate(feed.chunks):
                batch = feed.get(it, i)
                self._micro_batch_backward(batch, mb, it, i, passes, normalizer, old_logps, sums)
        except Exception as e:
            return e
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return None

    def _micro_batch_backward(
        self, batch: dict[str, Any], mb: list, it: int, i: int, passes: int, normalizer: Any,
        old_logps: list[torch.Tensor], sums: _StepSums,
    ) -> None:
        """Forward, GRPO loss and backward of micro-batch `i` in pass `it`; adds to `sums`."""
        cfg = self.cfg
        logps, entropies, full_logps = self._completion_logps(
            self.model, batch, with_entropy=True, with_full=True
        )
        # A sampled token the current top-k/top-p excludes has probability 0 under this policy
        # (-inf): left out of the loss, counted.
        outside = torch.isinf(logps)
        logps = logps.masked_fill(outside, 0.0)
        mask = batch["completion_mask"] * (~outside).to(batch["completion_mask"].dtype)
        if it == 0 and passes > 1:
            old_logps.append(logps.detach())
        ref_logps = None
        if cfg.beta != 0.0:
            with torch.no_grad():
                ref_logps = self._reference_logps(batch)
        loss, s = grpo_loss(
            logps,
            batch["advantages"],
            mask,
            cfg,
            normalizer,
            sampling_per_token_logps=batch["sampling_logps"],
            ref_per_token_logps=ref_logps,
            old_per_token_logps=old_logps[i] if it > 0 else None,
            kl_per_token_logps=full_logps,
        )
        loss.backward()
        sums.add(loss, s, entropies, mask, outside, batch["completion_mask"], mb, self._policy_version)

    def _stop_if_any_rank_failed(self, failure: BaseException | None) -> None:
        """Every rank learns whether any rank failed (one tiny collective) so that no rank is
        left waiting in the gradient all-reduce until the timeout; nobody steps."""
        flag = torch.tensor([float(failure is not None)], device=self.device)
        failed = D.all_reduce_(flag, "max")
        if failure is not None or float(failed) > 0:
            self.optimizer.zero_grad(set_to_none=True)
            if failure is not None:
                raise failure
            raise RuntimeError("train_step failed on another learner rank; no update was made")

    def _clip_and_step(self, normalizer: Any) -> tuple[float, torch.Tensor, float, bool]:
        """Gradients of the whole batch on every rank, clip, AdamW step (none for an empty
        batch). Returns (when this began, the gradient norm before clipping, the lr, stepped)."""
        self._sync()
        t_opt = time.perf_counter()
        D.all_reduce_gradients_(self.params)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = self.scheduler.get_last_lr()[0]
        stepped = normalizer.num_sequences > 0
        if stepped:
            self.optimizer.step()
        return t_opt, grad_norm, lr, stepped

    def _end_batch(self, stepped: bool) -> None:
        """One scheduler step and one policy version per batch, however many passes."""
        if stepped:
            self.scheduler.step()
            self.step += 1
            self._policy_version += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        if self.config.release_memory_after_step and self.device.type == "cuda":
            torch.cuda.empty_cache()  # a colocated engine wakes into this memory

    def _step_metrics(
        self, total: dict[str, float], passes: int, normalizer: Any, grad_norm: torch.Tensor,
        lr: float, stepped: bool, placeholder_steps: int, times: dict[str, float],
    ) -> dict[str, float]:
        """Metrics of the whole batch from `_StepSums.reduce`: token means over all passes,
        counts of one pass."""
        tokens = max(total["tokens"], 1.0)
        total["tokens"] /= passes
        n = max(normalizer.num_sequences, 1)
        is_min, is_max = total["is_min"], total["is_max"]
        return {
            "loss": total["loss"],
            "kl": total["kl"] / tokens,
            "entropy": total["entropy"] / tokens,
            "clip_ratio/low_mean": total["clip_low"] / tokens,
            "clip_ratio/high_mean": total["clip_high"] / tokens,
            "clip_ratio/region_mean": total["clip_region"] / tokens,
            "is_ratio/mean": total["is_ratio"] / tokens,
            "is_ratio/min": is_min if math.isfinite(is_min) else 0.0,
            "is_ratio/max": is_max if math.isfinite(is_max) else 0.0,
            "is_ratio/masked_fraction": total["is_masked"] / tokens,
            # Sampled tokens the current top-k/top-p excludes (probability 0 now; not trained).
            "tokens_outside_filter": total["outside_filter"],
            "grad_norm": float(grad_norm),
            "lr": float(lr),
            "tokens": total["tokens"],
            "prompt_tokens": total["prompt_tokens"],
            "samples": float(normalizer.num_sequences),
            "staleness_mean": total["staleness"] / n,
            # Over completion tokens: each token's own version (in-flight updates).
            "staleness_token_mean": total["token_lag"] / max(total["lag_tokens"], 1.0),
            "staleness_token_max": total["lag_max"],
            "skipped": 0.0 if stepped else 1.0,
            "policy_version": float(self._policy_version),
            "step": float(self.step),
            "step_time_s": time.perf_counter() - times["t0"],
            "dropped_placeholder_steps": float(placeholder_steps),
            # Where this rank's time went: collate (incl. image processing on CPU), forward +
            # backward, gradient all-reduce + clip + optimizer.
            "time/collate_wait_s": times["collate"],
            # incl. sample building
            "time/forward_backward_s": times["t_opt"] - times["t0"] - times["collate"],
            "time/optimizer_s": times["optimizer"],
        }

    def score(self, groups: list[TrajectoryGroup]) -> dict[tuple[str, int], list[float]]:
        """The current policy's logprobs of every trainable step's completion tokens, scored as
        `train_step` scores them (the step's sampling settings, `score_with_sampling_filters`),
        keyed by (episode_id, step index). No gradient, no update: at the sampling version they
        equal the engine's logprobs (the importance ratio is 1)."""
        samples, _ = build_samples(groups, self.cfg)
        samples = [s for s in samples if not self.placeholder_ids.intersection(s.completion_ids)]
        self.model.eval()
        out: dict[tuple[str, int], list[float]] = {}
        try:
            with torch.no_grad():
                for mb in micro_batches(samples, self.config.micro_batch_size):
                    batch = self._prepare(mb, False, {})
                    logps = self._completion_logps(self.model, to_device(batch, self.device), False)[0]
                    for row, s in zip(logps.cpu(), mb):
                        out[(s.episode_id, s.step_index)] = row[: len(s.completion_ids)].tolist()
        finally:
            self.model.train()
        return out

    # --- the supervised warm start (learner/sft.py) -----------------------------------------

    def sft_step(self, groups: list[TrajectoryGroup], lr: float) -> dict[str, float]:
        """One step of completion-only cross-entropy on demonstrations (same groups on every rank)."""
        from .sft import sft_step

        return sft_step(self, groups, lr, train=True)

    def sft_loss(self, groups: list[TrajectoryGroup]) -> dict[str, float]:
        """The demonstrations' mean token loss without a gradient (held-out demonstrations)."""
        from .sft import sft_step

        return sft_step(self, groups, 0.0, train=False)

    def finish_warm_start(self) -> int:
        """Fresh optimizer state for GRPO; the policy version moves once. Returns it."""
        from .sft import finish_warm_start

        return finish_warm_start(self)

    def _reference_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """The reference model's full-softmax logprobs at the temperature: the KL is between the
        two models' whole distributions (TRL's), not their top-k/top-p truncations (where a
        token outside the reference's top-k would make it infinite)."""
        if self.ref_model is not None:
            return self._completion_logps(self.ref_model, batch, with_entropy=False, filtered=False)[0]
        # LoRA: the base model with the adapters switched off is the reference (as TRL).
        with self.model.disable_adapter():
            return self._completion_logps(self.model, batch, with_entropy=False, filtered=False)[0]

    # --- versions and weights ----------------------------------------------------------------

    @property
    def policy_version(self) -> int:
        """Version of the current weights (0 = the initial model; +1 per `train_step`, whatever
        `grpo.num_iterations`)."""
        return self._policy_version

    def get_policy_version(self) -> int:
        """`policy_version` as a method (Ray actors expose methods, not properties)."""
        return self._policy_version

    def advance_policy_version(self, version: int) -> int:
        """Moves the version counter up to `version` without touching the weights or the step: a
        learner restored from a checkpoint inside a run publishes its weights under a version
        above every one the engines were sent (cluster/learner_recovery.py). Never goes back."""
        if version < self._policy_version:
            raise ValueError(f"policy versions never go back: {version} < {self._policy_version}")
        self._policy_version = int(version)
        return self._policy_version

    def get_weights(self) -> dict[str, torch.Tensor]:
        """Named CPU tensors, Hugging Face checkpoint names, `publish_dtype`."""
        if self.device.type == "cuda" and getattr(self, "_staging", None) is None:
            self._staging = PinnedStaging()
        return hf_named_tensors(self.model, _DTYPES[self.config.publish_dtype],
                                staging=getattr(self, "_staging", None))

    # --- weight sync (weightsync/): rank 0's end of the strategy the driver picked --------------

    def _sender(self, kind: str):
        if self.weight_senders is None:
            raise RuntimeError("only learner rank 0 sends weights")
        return self.weight_senders.get(kind)

    def setup_weight_sync(self, kind: str, **options: Any) -> dict:
        """Rank 0: prepares strategy `kind`; returns what every receiver needs to join."""
        return self._sender(kind).setup(**options)

    def connect_weight_sync(self, kind: str, world_size: int, timeout_s: float = 300.0) -> None:
        """Rank 0 joins the receivers (call concurrently with theirs)."""
        self._sender(kind).connect(world_size, timeout_s)

    def send_weights(self, kind: str = "object_store", update: WeightUpdate | None = None) -> WeightUpdate | None:
        """Rank 0 sends the current version through strategy `kind` and returns its update; other
        ranks return None (their weights are identical)."""
        if self.rank != 0:
            return None
        return self._sender(kind).send(update)

    def weight_sync_probe(self, kind: str, repeats: int = 3) -> dict:
        """Raw bandwidth of strategy `kind`'s link (the receivers probe concurrently)."""
        return self._sender(kind).probe(repeats)

    def parameters_digest(self) -> list[float]:
        """A cheap fingerprint of the trainable parameters (sum, abs-sum per tensor): lets tests
        and the driver check that ranks or runs agree."""
        with torch.no_grad():
            return [float(p.double().sum()) + float(p.double().abs().sum()) for p in self.params]

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, path: str | os.PathLike, data_cursor: dict | None = None) -> str:
        """Rank 0 writes `path/step-NNNNNN` atomically and points `path/latest` at it; every
        rank waits for it. Returns the checkpoint folder."""
        name = ckpt.checkpoint_name(self.step)
        target = Path(path) / name
        if self.rank == 0:
            target = ckpt.save_atomically(
                path, name, lambda d: self._write_checkpoint(d, data_cursor or {}),
                keep=self.config.keep_checkpoints,
            )
        D.barrier()
        return str(target)

    def _write_checkpoint(self, directory: Path, data_cursor: dict) -> None:
        model_dir = directory / ckpt.MODEL_DIR
        base = self.model.get_base_model() if self.config.lora.enabled else self.model
        base.save_pretrained(model_dir, state_dict=hf_named_tensors(self.model))
        ckpt.copy_model_side_files(self.config.model_path, model_dir)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "policy_version": self._policy_version,
            "step": self.step,
            "world_size": self.world_size,
        }
        if self.config.lora.enabled:
            state["trainable"] = {
                n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad
            }
        torch.save(state, directory / ckpt.TRAINING_STATE)
        ckpt.write_cursor(directory, data_cursor)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restores weights, optimizer, scheduler, RNG, step and policy version from a checkpoint
        folder or a root with `latest`. Returns the data cursor saved with it."""
        from safetensors.torch import load_file

        directory = ckpt.resolve(path)
        state = torch.load(directory / ckpt.TRAINING_STATE, map_location="cpu", weights_only=False)
        if self.config.lora.enabled:
            named = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, t in state["trainable"].items():
                    named[n].copy_(t)
        else:
            weights: dict[str, torch.Tensor] = {}
            for f in sorted((directory / ckpt.MODEL_DIR).glob("*.safetensors")):
                weights.update(load_file(str(f)))
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            expected_missing = set(self.model.state_dict()) - set(hf_named_tensors(self.model))
            if unexpected or set(missing) - expected_missing:
                raise ckpt.CheckpointError(
                    f"{directory}: weights do not match the model (missing "
                    f"{sorted(set(missing) - expected_missing)[:5]}, unexpected {unexpected[:5]})"
                )
            if expected_missing and hasattr(self.model, "tie_weights"):
                self.model.tie_weights()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self._policy_version = int(state["policy_version"])
        self.step = int(state["step"])
        D.barrier()
        return ckpt.read_cursor(directory)

    def train_step_refs(self, refs: list[Any]) -> dict[str, float]:
        """`train_step` on groups passed by reference: the driver sends the object refs the
        rollout workers returned (Ray resolves top-level arguments only, so a list of refs arrives
        as refs); every rank fetches the groups from the object store itself."""
        return self.train_step(ray.get(list(refs)))

    def close(self) -> None:
        """Leaves the process group."""
        D.destroy()


# Ray at the edge: resources (CPUs, GPUs, placement) are the driver's decision (cluster/).
LearnerActor = ray.remote(Learner)
