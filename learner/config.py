"""Learner configuration: the GRPO objective (TRL 1.16's option names and meanings) and the
training machinery around it (model, optimizer, schedule, batching, devices, ranks)."""

from __future__ import annotations

from dataclasses import dataclass, field

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class GRPOConfig:
    """The objective. Names, defaults and meanings follow `trl.GRPOConfig` (TRL 1.16)."""

    num_generations: int = 8
    """G: episodes per group (same task and seed). Groups that lost episodes to infrastructure
    failures are still used with the episodes they have (see `min_group_size`)."""
    min_group_size: int = 2
    """Groups with fewer trainable episodes than this are dropped (a baseline of one is no baseline)."""
    beta: float = 0.0
    """KL coefficient against a frozen reference model (the initial weights). 0 (TRL's default):
    no reference model is loaded."""
    epsilon: float = 0.2
    """Lower clipping bound: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None = None
    """Upper clipping bound; None means equal to `epsilon` (DAPO recommends 0.28)."""
    delta: float | None = None
    """Two-sided clipping (INTELLECT-2): cap the unclipped ratio at `delta`; None = off."""
    loss_type: str = "dapo"
    """How per-token losses are aggregated: grpo (per-sequence mean, then mean over sequences),
    bnpo and dapo (sum over tokens / active tokens of the whole batch), dr_grpo (sum over tokens /
    (sequences * max_completion_length)). Here every normaliser is taken over the whole batch
    handed to `train_step`, so micro-batches and ranks do not change the update (see loss.py)."""
    scale_rewards: str = "group"
    """Advantage scaling: group (divide by the group's std), batch (by the batch's std), none."""
    importance_sampling_level: str = "token"
    """Policy ratio per token, or one ratio per sequence (GSPO: mean of the token log-ratios)."""
    temperature: float = 1.0
    """Sampling temperature: logits are divided by it before the log-softmax, so the learner's
    logprobs are of the distribution the engine sampled from. Derived from
    `rollout.sampling.temperature` in a training run; each step's own recorded temperature wins
    (async and resumed runs score with what was actually used)."""
    top_k: int = -1
    """Top-k of the sampling distribution (<= 0: off); derived from `rollout.sampling.top_k`, a
    step's recorded value wins. Applied to the logits before the log-softmax when
    `score_with_sampling_filters` is on."""
    top_p: float = 1.0
    """Top-p of the sampling distribution (1.0: off); derived from `rollout.sampling.top_p`, a
    step's recorded value wins."""
    score_with_sampling_filters: bool = True
    """True: score completions with exactly the distribution the engine sampled from
    (temperature, then the same top-k / top-p masking of the logits, then the log-softmax), which
    is what the engines report as logprobs, so the importance ratio at the sampling version is 1.
    False: TRL's behaviour, the full softmax over the vocabulary at the temperature (top-k/top-p
    ignored by the learner; the importance-sampling correction then absorbs the difference)."""
    num_iterations: int = 1
    """TRL's mu: optimizer passes over each batch. The old-policy logprobs of the clipped ratio
    are taken in the first pass, so with mu > 1 the later passes clip (epsilon, epsilon_high,
    delta act). The policy version still moves by one per batch."""
    mask_truncated_completions: bool = False
    """Exclude completions the engine cut at max_new_tokens (finish_reason == "length") from the loss."""
    max_completion_length: int = 512
    """The dr_grpo normalising constant: TRL's generation limit, so in a training run it is
    derived from `rollout.sampling.max_new_tokens` (setting it apart is refused)."""
    vllm_importance_sampling_correction: bool = True
    """Correct the mismatch between the engine's sampling logprobs and the learner's recomputed
    logprobs (including staleness in async mode) with truncated importance sampling."""
    vllm_importance_sampling_mode: str = "sequence_mask"
    """token_truncate / token_mask / sequence_truncate / sequence_mask, as in TRL."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """Upper bound C_max of the correction ratio (the "cap"): clipped (truncate) or zeroed (mask)."""
    vllm_importance_sampling_clip_min: float | None = None
    """Lower bound C_min of the correction ratio; None = no lower bound."""
    drop_zero_variance_groups: bool = False
    """Drop groups whose returns are all equal (zero advantage: no policy gradient, but they still
    count in the normalisers and the KL when kept). Always counted in the metrics."""

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def resolved_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> None:
        if self.num_generations < 1:
            raise ValueError(f"grpo.num_generations must be >= 1, got {self.num_generations}")
        if self.min_group_size < 1:
            raise ValueError(f"grpo.min_group_size must be >= 1, got {self.min_group_size}")
        if self.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {self.beta}")
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"grpo.epsilon must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"grpo.epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and self.delta <= 1 + self.resolved_epsilon_high:
            raise ValueError(
                f"grpo.delta ({self.delta}) must be greater than 1 + epsilon_high "
                f"({1 + self.resolved_epsilon_high})"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"grpo.scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}"
            )
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"grpo.importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        if self.temperature <= 0:
            raise ValueError(f"grpo.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"grpo.top_p must be in (0, 1], got {self.top_p}")
        if self.num_iterations < 1:
            raise ValueError(f"grpo.num_iterations must be >= 1, got {self.num_iterations}")
        if self.max_completion_length < 1:
            raise ValueError(
                f"grpo.max_completion_length must be >= 1, got {self.max_completion_length}"
            )
        if self.vllm_importance_sampling_mode not in VLLM_IS_MODES:
            raise ValueError(
                f"grpo.vllm_importance_sampling_mode must be one of {VLLM_IS_MODES}, "
                f"got {self.vllm_importance_sampling_mode!r}"
            )
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(
                f"grpo.vllm_importance_sampling_clip_min ({lo}) must be less than "
                f"vllm_importance_sampling_clip_max ({hi})"
            )
        if (
            self.vllm_importance_sampling_correction
            and self.vllm_importance_sampling_mode.endswith("_truncate")
            and lo is None
            and hi is None
        ):
            raise ValueError(
                "grpo: a *_truncate vllm_importance_sampling_mode needs "
                "vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max"
            )


@dataclass
class LoraConfig:
    """Optional LoRA adapters through peft (the `peft` extra). Published weights are merged."""

    enabled: bool = False
    """Train LoRA adapters instead of the full model."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Module names to adapt."""

    def validate(self) -> None:
        if self.enabled and self.r < 1:
            raise ValueError(f"learner.lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"learner.lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class LearnerConfig:
    """Model, optimizer, schedule, batching, devices and ranks of the learner."""

    model_path: str = ""
    """A Hugging Face model folder (text or vision-language); loaded with transformers."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """The objective."""
    lr: float = 1e-6
    """AdamW peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    lr_schedule: str = "constant_with_warmup"
    """constant, constant_with_warmup, linear or cosine (decay to 0 at `total_steps`)."""
    total_steps: int = 1000
    """Optimizer steps of the run (the horizon of the linear and cosine schedules)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (<= 0: no clipping, the norm is still reported)."""
    micro_batch_size: int = 4
    """Training samples (one episode step each) per forward/backward on one rank."""
    dtype: str = "float32"
    """Compute dtype: float32, or bfloat16 / float16 autocast on GPU (parameters and the optimizer
    state stay float32)."""
    device: str = "cpu"
    """cpu or cuda (each rank uses cuda:<local rank> when there are several)."""
    fp32_logits: bool = True
    """Apply the output layer (lm_head) in float32 to the completion positions, so the
    log-softmax and the importance ratios see float32 logits, not bf16 logits cast up (matters
    only under bf16/fp16 autocast; see bench/bench_learner.py --logits-dtype)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    attn_implementation: str = "sdpa"
    """transformers attention backend (sdpa, eager, flash_attention_2)."""
    packed_vision_attention: bool = True
    """Qwen3-VL with sdpa: the vision tower attends over all images of a micro-batch in one call
    instead of one call (and one GPU sync) per image and block; same results (learner/vision.py)."""
    compile: bool = False
    """torch.compile every transformer layer (text decoder layers and vision blocks: norms,
    rotary embedding, activations and residual adds fused into fewer kernels; on GPU the step is
    bound by kernel launches, see README). The first micro-batches pay the compile time."""
    release_memory_after_step: bool = False
    """Return the CUDA caching allocator's free blocks to the GPU after every step, so an engine
    sharing the GPU can wake up (set from cluster.colocate)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Optional LoRA."""
    seed: int = 0
    """Seeds torch/numpy/random on every rank (the same on every rank: the model is identical)."""
    num_ranks: int = 1
    """Learner ranks (data parallel through torch.distributed: gloo on CPU, nccl on GPU)."""
    dist_timeout_s: float = 600.0
    """Timeout of every collective (process-group timeout)."""
    publish_dtype: str = "float32"
    """dtype of the published weights (bfloat16 halves the transfer to the engines)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones); at least 1."""

    def validate(self) -> None:
        self.grpo.validate()
        self.lora.validate()
        if not self.model_path:
            raise ValueError("learner.model_path is empty: give a Hugging Face model folder")
        if self.lr < 0:
            raise ValueError(f"learner.lr must be >= 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"learner.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"learner.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"learner.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.total_steps < 1:
            raise ValueError(f"learner.total_steps must be >= 1, got {self.total_steps}")
        if self.micro_batch_size < 1:
            raise ValueError(f"learner.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"learner.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.publish_dtype not in DTYPES:
            raise ValueError(
                f"learner.publish_dtype must be one of {DTYPES}, got {self.publish_dtype!r}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"learner.device must be cpu or cuda, got {self.device!r}")
        if self.device == "cpu" and self.dtype != "float32":
            raise ValueError("learner.dtype must be float32 on cpu (autocast is for GPUs)")
        if self.num_ranks < 1:
            raise ValueError(f"learner.num_ranks must be >= 1, got {self.num_ranks}")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"learner.dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"learner.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
