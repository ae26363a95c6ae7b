"""Trajectory groups -> training samples -> padded micro-batches.

Every step of an episode is one training sample: its exact prompt ids (images already expanded
into image tokens by the engine's processor) followed by its exact completion ids; all of its
completion tokens carry the episode's advantage. Nothing is re-tokenized. Images (PNG bytes, as
the engine saw them) go through the model's image processor to give `pixel_values` and
`image_grid_thw`; the number of image tokens in the prompt must match what the processor says
the images occupy, else the step is rejected with a clear error.

Layout (TRL's): prompts padded on the left, completions on the right, so the completion logits
are the last `T + 1` positions of every row (`logits_to_keep`).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import torch

from core.trajectory import TrajectoryGroup

from .advantages import AdvantageStats, compute_advantages
from .config import GRPOConfig
from .loss import BatchNormalizer


class BatchError(ValueError):
    """A step that cannot be trained on as recorded (e.g. image tokens and images disagree)."""


@dataclass
class TrainingSample:
    """One step of one episode, ready to be collated."""

    prompt_ids: list[int]
    completion_ids: list[int]
    sampling_logprobs: list[float]
    """The engine's processed logprobs of the completion tokens."""
    advantage: float
    truncated: bool
    """The engine stopped at its token limit (finish_reason == "length")."""
    policy_version: int
    episode_id: str = ""
    group_id: str = ""
    step_index: int = 0
    images: list[bytes] = field(default_factory=list)
    temperature: float = 1.0
    """Sampling settings the completion was drawn with (the step's record, else the config's)."""
    top_k: int = -1
    top_p: float = 1.0
    token_versions: list[int] = field(default_factory=list)
    """The policy version that sampled each completion token (the step's record; empty: all
    `policy_version`). The engine's logprob of each token is that version's, so the importance
    correction, which is per token, needs nothing more; the per-token lag figures use them."""

    def token_lags(self, version: int) -> list[int]:
        """`version` minus the version of each completion token."""
        versions = self.token_versions or [self.policy_version] * len(self.completion_ids)
        return [version - v for v in versions]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def build_samples(
    groups: list[TrajectoryGroup], cfg: GRPOConfig
) -> tuple[list[TrainingSample], AdvantageStats]:
    """Advantages per episode, then one sample per step of every trainable episode (in order)."""
    episodes, stats = compute_advantages(groups, cfg)
    samples: list[TrainingSample] = []
    for ep in episodes:
        t = ep.trajectory
        for s in t.steps:
            if not s.completion_ids:
                continue  # nothing sampled, nothing to train (e.g. an engine error step)
            if not s.prompt_ids:
                raise BatchError(f"episode {t.episode_id} step {s.index}: empty prompt_ids")
            # What the step was sampled with wins over the config (async, resumed runs).
            temperature = cfg.temperature if s.temperature is None else s.temperature
            if temperature <= 0:
                raise BatchError(
                    f"episode {t.episode_id} step {s.index}: sampled greedily (temperature "
                    f"{temperature}); greedy logprobs are not a sampling distribution to train on"
                )
            samples.append(
                TrainingSample(
                    prompt_ids=list(s.prompt_ids),
                    completion_ids=list(s.completion_ids),
                    sampling_logprobs=list(s.logprobs),
                    advantage=ep.advantage,
                    truncated=s.finish_reason == "length",
                    policy_version=s.policy_version,
                    episode_id=t.episode_id,
                    group_id=ep.group_id,
                    step_index=s.index,
                    images=list(s.images),
                    temperature=float(temperature),
                    top_k=int(cfg.top_k if s.top_k is None else s.top_k),
                    top_p=float(cfg.top_p if s.top_p is None else s.top_p),
                    token_versions=list(s.token_versions),
                )
            )
    return samples, stats


def batch_normalizer(samples: list[TrainingSample], cfg: GRPOConfig) -> BatchNormalizer:
    """The loss denominators of the whole batch (call before sharding / micro-batching)."""
    tokens = sum(
        len(s.completion_ids)
        for s in samples
        if not (cfg.mask_truncated_completions and s.truncated)
    )
    return BatchNormalizer(num_sequences=len(samples), num_tokens=tokens)


def shard(samples: list[TrainingSample], rank: int, world_size: int) -> list[TrainingSample]:
    """This rank's share of the batch (round robin: ranks get equal counts within one)."""
    return samples[rank::world_size]


def micro_batches(samples: list[TrainingSample], size: int) -> list[list[TrainingSample]]:
    """As few micro-batches of at most `size` samples as possible, balanced: their sizes differ by
    at most one (17 samples at size 8: 6, 6, 5, not 8, 8, 1). A 1-sample micro-batch costs a
    torch.compile recompile (batch size 1 is specialised; `torch._logging` shows it on CPU), and
    balanced ones pad less. The loss uses whole-batch denominators, so the split does not
    change the gradient."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    n = -(-len(samples) // size)  # ceil
    base, extra = divmod(len(samples), n) if n else (0, 0)
    out, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        out.append(samples[start:end])
        start = end
    return out


@dataclass
class VisionSpec:
    """What collating images needs from the model's processor and config."""

    image_processor: Any
    image_token_id: int
    merge_size: int


def _decode_png(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def collate(
    samples: list[TrainingSample],
    pad_token_id: int,
    mask_truncated_completions: bool = False,
    vision: VisionSpec | None = None,
    device: str | torch.device = "cpu",
    image_cache: dict[bytes, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Pads one micro-batch: prompts left, completions right.

    Returns input_ids, attention_mask (B, P + T), completion_mask, sampling_logps (B, T),
    advantages, temperature, top_k, top_p (B,), logits_to_keep (= T), and for images pixel_values, image_grid_thw,
    mm_token_type_ids. `image_cache` (keyed by the images' PNG bytes) lets a batch process
    an image once: the G episodes of a group start from the same screenshot.
    On a GPU the tensors are copied from pinned memory without blocking the host, so the
    next micro-batch is collated while the GPU still works on this one.
    """
    if not samples:
        raise BatchError("collate: empty micro-batch")
    batch = _padded_tokens(samples, pad_token_id, mask_truncated_completions)
    has_images = any(s.images for s in samples)
    if has_images and vision is None:
        raise BatchError("steps carry images but the model has no image processor (text model?)")
    if vision is not None:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        batch["mm_token_type_ids"] = (input_ids == vision.image_token_id).to(torch.int)
        batch["mm_token_type_ids"][attention_mask == 0] = 0
    if has_images:
        pixel_values, grids = [], []
        for s in samples:
            out = _sample_images(s, vision, image_cache)
            if out is not None:
                pixel_values.append(out["pixel_values"])
                grids.append(out["image_grid_thw"])
        batch["pixel_values"] = torch.cat(pixel_values, dim=0)
        batch["image_grid_thw"] = torch.cat(grids, dim=0)
    elif vision is not None:
        # A VL model with text-only steps: no vision inputs at all.
        for s in samples:
            if any(t == vision.image_token_id for t in s.prompt_ids):
                raise BatchError(
                    f"episode {s.episode_id} step {s.step_index}: image tokens in prompt_ids but "
                    f"no images recorded"
                )
    return to_device(batch, device)


def _padded_tokens(
    samples: list[TrainingSample], pad_token_id: int, mask_truncated_completions: bool
) -> dict[str, Any]:
    """The text part of a batch: prompts padded left and completions right, so every row's
    completion starts at the same position P (the logits of the last T + 1 positions suffice)."""
    B = len(samples)
    P = max(len(s.prompt_ids) for s in samples)
    T = max(len(s.completion_ids) for s in samples)
    input_ids = torch.full((B, P + T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    completion_mask = torch.zeros((B, T), dtype=torch.float32)
    sampling_logps = torch.zeros((B, T), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        input_ids[i, P - p : P] = torch.tensor(s.prompt_ids, dtype=torch.long)
        input_ids[i, P : P + c] = torch.tensor(s.completion_ids, dtype=torch.long)
        attention_mask[i, P - p : P + c] = 1
        if not (mask_truncated_completions and s.truncated):
            completion_mask[i, :c] = 1.0
        sampling_logps[i, :c] = torch.tensor(s.sampling_logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "sampling_logps": sampling_logps,
        "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        # Plain lists: read on the host per row, so a GPU batch needs no sync to read them.
        "temperature": [s.temperature for s in samples],
        "top_k": [s.top_k for s in samples],
        "top_p": [s.top_p for s in samples],
        "logits_to_keep": T,
    }


def _sample_images(
    s: TrainingSample, vision: VisionSpec, image_cache: dict[bytes, dict[str, torch.Tensor]] | None
) -> dict[str, torch.Tensor] | None:
    """One sample's processed images ({"pixel_values", "image_grid_thw"}), None for a text-only
    step; checked against the image tokens its prompt_ids hold (the engine's processor made them)."""
    n_tokens = sum(1 for t in s.prompt_ids if t == vision.image_token_id)
    if not s.images:
        if n_tokens:
            raise BatchError(
                f"episode {s.episode_id} step {s.step_index}: {n_tokens} image tokens in "
                f"prompt_ids but no images recorded"
            )
        return None
    key = b"".join(hashlib.sha1(b).digest() for b in s.images)
    out = image_cache.get(key) if image_cache is not None else None
    if out is None:
        out = vision.image_processor(
            images=[_decode_png(b) for b in s.images], return_tensors="pt"
        )
        out = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        if image_cache is not None:
            image_cache[key] = out
    grid = out["image_grid_thw"]
    expected = int((grid.prod(dim=-1) // (vision.merge_size**2)).sum())
    if expected != n_tokens:
        raise BatchError(
            f"episode {s.episode_id} step {s.step_index}: prompt_ids hold {n_tokens} image "
            f"tokens but the {len(s.images)} recorded image(s) make {expected} with this "
            f"image processor (different processor settings than the engine's?)"
        )
    return out


def to_device(batch: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """Moves a collated batch; to a GPU from pinned memory without blocking the host."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            k: (v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()
        }
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
