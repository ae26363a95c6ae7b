"""vLLM general plugin (entry point `vllm.general_plugins`): Qwen3-VL on machines without torchvision.

vLLM runs general plugins in every process it starts (engine core, workers), before loading the
model. On the CPU machines torchvision is absent (PyPI only has CUDA builds, which break beside the
CPU torch), and vLLM's `qwen3_vl.py` imports transformers' torchvision-based Qwen2-VL image
processing module, and always builds `Qwen3VLProcessor` with its video processor, which
transformers resolves to a "requires torchvision" placeholder. This plugin points that module name
at its PIL twin (same names: `smart_resize`, the image processor) and exposes the real
`Qwen3VLVideoProcessor` class (it constructs without torchvision; we never send video). With
torchvision present (the GPU machines) it does nothing.
"""

from __future__ import annotations

import importlib
import logging
import sys

logger = logging.getLogger(__name__)

_TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


def _torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # missing, or a CUDA build that fails to load its operators on CPU
        return False


def register() -> None:
    """Installs the PIL stand-in for transformers' torchvision-based Qwen2-VL image module if needed."""
    if _torchvision_works() or _TORCHVISION_MODULE in sys.modules:
        return
    try:
        importlib.import_module(_TORCHVISION_MODULE)
    except ImportError:
        sys.modules[_TORCHVISION_MODULE] = importlib.import_module(_PIL_MODULE)
        logger.info("bgrpo: no torchvision; %s now resolves to %s", _TORCHVISION_MODULE, _PIL_MODULE)
    # transformers' lazy modules hand out a placeholder for classes whose backend is missing;
    # setting the attribute puts the real class in the module's __dict__, ahead of the lookup.
    # The processor's type check looks `BaseVideoProcessor` up on the top-level module, too.
    import transformers
    import transformers.models.qwen3_vl as qwen3_vl
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    for module in (qwen3_vl, transformers):
        setattr(module, "Qwen3VLVideoProcessor", Qwen3VLVideoProcessor)
    setattr(transformers, "BaseVideoProcessor", BaseVideoProcessor)
