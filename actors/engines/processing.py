"""The one place that turns chat requests into model inputs: load the processor, render the prompt once.

Every engine, the learner and the tests go through here, so the prompt token ids a `Generation`
reports are exactly what the model saw and what the learner trains on: nothing is ever
re-tokenized between the engine and the learner (ids and images go through unchanged).

Loading the processor itself lives in `core.processor` (the learner needs it too).
"""

from __future__ import annotations

import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from actors.engine import ChatRequest, EngineError
from core.processor import is_vision_language, load_processor, model_config, tokenizer_of  # noqa: F401 (re-exported for the engines)


def load_image(image: Any):
    """A PIL RGB image from a PIL image or PNG/JPEG bytes; `EngineError` for anything else."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()
        except (UnidentifiedImageError, OSError) as err:
            raise EngineError(f"image is not a decodable PNG/JPEG ({len(image)} bytes): {err}") from None
        return img.convert("RGB")
    raise EngineError(f"image must be a PIL.Image or PNG/JPEG bytes, got {type(image).__name__}")


def _count_image_parts(messages: Sequence[dict[str, Any]]) -> int:
    n = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise EngineError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.200}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise EngineError(f"message {i} content must be a str or a list of parts, got {type(content).__name__}")
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise EngineError(f"message {i}: unsupported content part {part!r:.200} (use text or image)")
            n += part["type"] == "image"
    return n


@dataclass
class RenderedPrompt:
    """One request rendered for the model: exact prompt ids plus the model's image inputs."""

    prompt_ids: list[int]
    images: list[Any] = field(default_factory=list)
    """PIL RGB images, in prompt order (what vLLM gets as multi_modal_data)."""
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    placeholder_ids: list[int] | None = None
    """The prompt with one image placeholder token per image, not yet expanded to the image's token
    count: what vLLM wants with multi_modal_data (it expands placeholders itself, and would expand
    already-expanded ones again)."""


def render_prompt(processor, request: ChatRequest, pixels: bool = True) -> RenderedPrompt:
    """Renders the chat template once (generation prompt added) and tokenizes it, images included.

    `pixels=False` (the vLLM engine, which preprocesses images itself) skips the image processor:
    each image placeholder is expanded to the token count the processor's own size arithmetic gives
    (`expand_image_tokens`), and `pixel_values` stays None. The image processor was 2.3 s of a
    5.9 s vLLM call of 256 screenshot requests on an H200 host (cProfile), repeated inside vLLM.

    Raises `EngineError` for empty messages, malformed parts, an image count that does not match
    the image parts, images that are not images, or images sent to a text-only model.
    """
    if not request.messages:
        raise EngineError("request has no messages")
    n_parts = _count_image_parts(request.messages)
    if n_parts != len(request.images):
        raise EngineError(f"request has {n_parts} image part(s) but {len(request.images)} image(s)")
    tokenizer = tokenizer_of(processor)
    text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    if not request.images:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return RenderedPrompt(prompt_ids=list(ids))
    images = load_images(request.images)
    if not hasattr(processor, "image_processor"):
        raise EngineError("request has images but the model is text-only")
    if not pixels and _expands_by_size(processor):
        placeholder_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return RenderedPrompt(
            prompt_ids=expand_image_tokens(processor, placeholder_ids, images),
            images=images,
            placeholder_ids=placeholder_ids,
        )
    out = processor(text=[text], images=images, return_tensors="pt")
    return RenderedPrompt(
        prompt_ids=out["input_ids"][0].tolist(),
        images=images,
        pixel_values=out["pixel_values"],
        image_grid_thw=out["image_grid_thw"],
        placeholder_ids=list(tokenizer(text, add_special_tokens=False)["input_ids"]),
    )


def load_images(images: Sequence[Any]) -> list[Any]:
    """`load_image` for each; several PNGs are decoded on threads (PIL's decoder releases the GIL)."""
    if len(images) < 4:
        return [load_image(img) for img in images]
    return list(_decode_pool().map(load_image, images))


_DECODE_POOL: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    global _DECODE_POOL
    if _DECODE_POOL is None:
        _DECODE_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png-decode")
    return _DECODE_POOL


def _expands_by_size(processor) -> bool:
    """True for processors whose image token count follows from the image size alone (the Qwen-VL
    family: `get_number_of_image_patches` and a `merge_size`, one `image_token_id` per token)."""
    image_processor = getattr(processor, "image_processor", None)
    return (
        hasattr(image_processor, "get_number_of_image_patches")
        and hasattr(image_processor, "merge_size")
        and getattr(processor, "image_token_id", None) is not None
    )


def expand_image_tokens(processor, placeholder_ids: Sequence[int], images: Sequence[Any]) -> list[int]:
    """The prompt with each image placeholder token repeated as often as the processor would expand
    it: patches(height, width) / merge_size**2, the same arithmetic the processor and vLLM use.
    Raises `EngineError` when placeholders and images do not pair up."""
    image_token = processor.image_token_id
    image_processor = processor.image_processor
    merge = image_processor.merge_size ** 2
    positions = [i for i, t in enumerate(placeholder_ids) if t == image_token]
    if len(positions) != len(images):
        raise EngineError(f"prompt has {len(positions)} image placeholder(s) for {len(images)} image(s)")
    out: list[int] = []
    start = 0
    for pos, image in zip(positions, images):
        width, height = image.size
        count = image_processor.get_number_of_image_patches(height, width, {}) // merge
        out.extend(placeholder_ids[start:pos])
        out.extend([image_token] * count)
        start = pos + 1
    out.extend(placeholder_ids[start:])
    return out


def image_inputs(processor, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` for stored images (PIL or PNG bytes), as the engine made them.

    The learner uses this to rebuild a step's vision inputs from the PNGs in a trajectory; the
    prompt ids already hold the expanded image tokens, so no text is re-tokenized.
    """
    pil = [load_image(img) for img in images]
    out = processor.image_processor(images=pil, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Qwen3-VL's per-token modality (0 text, 1 image), needed for its multimodal rotary positions."""
    return (input_ids == image_token_id).to(torch.int32)


def render_requests(processor, requests: Sequence[ChatRequest], sampling, max_model_len: int,
                    pixels: bool = True) -> list[RenderedPrompt]:
    """What both engines do before sampling: validate the sampling settings, render every request
    once (`pixels`: see `render_prompt`), and refuse a prompt that leaves no room in the context.
    Raises `EngineError`."""
    try:
        sampling.validate()
    except ValueError as err:
        raise EngineError(f"bad sampling settings: {err}") from None
    # Every screenshot of the batch decoded at once, on threads (one image per request is the
    # common case, so per-request decoding would stay serial), before the serial rendering.
    decoded = iter(load_images([img for r in requests for img in r.images]))
    requests = [dataclasses.replace(r, images=[next(decoded) for _ in r.images]) if r.images else r for r in requests]
    rendered = [render_prompt(processor, r, pixels=pixels) for r in requests]
    for i, r in enumerate(rendered):
        if len(r.prompt_ids) >= max_model_len:
            raise EngineError(f"request {i}: prompt has {len(r.prompt_ids)} tokens, context is {max_model_len}")
    return rendered
