"""Loading a model folder's config and its processor (a VL model's processor, or a text model's
tokenizer): needed by the engines, which render prompts, and by the learner, which scores them.

Qwen3-VL without torchvision (the CPU machines): transformers' `Qwen3VLProcessor` refuses to build
because its video processor needs torchvision, and `AutoProcessor` then quietly returns only the
tokenizer. We never use video, so vision-language processors are always built here from the
tokenizer and the image processor with no video processor, on every machine (same rendering with or
without torchvision).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def model_config(model_path: str | os.PathLike) -> dict[str, Any]:
    """The model folder's config.json as a dict."""
    path = pathlib.Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {model_path!r} a Hugging Face model folder?") from None


def is_vision_language(model_path: str | os.PathLike) -> bool:
    """True for models with a vision tower (a `vision_config` in config.json)."""
    return "vision_config" in model_config(model_path)


def load_processor(model_path: str | os.PathLike):
    """The processor of a vision-language model, or the tokenizer of a text model.

    For VL models the processor has `.tokenizer` and `.image_processor` and no video processor;
    `processor(text=..., images=...)` expands each image placeholder to its image tokens.
    """
    from transformers import AutoTokenizer

    model_path = str(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    if not is_vision_language(model_path):
        return tokenizer
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_path)
    if config.model_type in ("qwen3_vl", "qwen3_vl_moe"):
        # The PIL image processor on every machine: AutoImageProcessor insists on torchvision here,
        # and one backend everywhere keeps the learner's pixel values identical across machines.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_path)

        class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
            """Qwen3VLProcessor that accepts no video processor (which would need torchvision)."""

            def check_argument_for_proper_class(self, argument_name, argument):
                if argument_name == "video_processor" and argument is None:
                    return None
                return super().check_argument_for_proper_class(argument_name, argument)

        processor = ImageOnlyQwen3VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None
        )
        processor.chat_template = tokenizer.chat_template
        return processor
    # Other VL families: their own processor (needs whatever it needs, e.g. torchvision).
    return AutoProcessor.from_pretrained(model_path)


def tokenizer_of(processor):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", processor)
