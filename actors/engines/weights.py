"""Checks a weight update against the model's parameters before any engine touches its weights.

Both backends call `validate_update` first, so an update is either entirely valid or refused with
an `EngineError` while the engine keeps its old weights and version. (How updates travel is
weightsync/'s business; this is the engine's own rule about what it accepts.)
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from actors.engine import EngineError

# Hugging Face projections that vLLM fuses into one parameter (qkv_proj, gate_up_proj). vLLM's CPU
# backend repacks a fused layer after loading it, so a partial update of one would leave the
# others uninitialised: an update must carry every member of a group it touches.
_FUSED_GROUPS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


def hf_parameter_shapes(model_path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the transformers model in `model_path` (learner-side names).

    Built on the meta device: no memory, no weights read.
    """
    from transformers import AutoConfig

    from actors.engines.processing import is_vision_language

    config = AutoConfig.from_pretrained(str(model_path))
    if is_vision_language(model_path):
        from transformers import AutoModelForImageTextToText as Auto
    else:
        from transformers import AutoModelForCausalLM as Auto
    with torch.device("meta"):
        model = Auto.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _group_key(name: str) -> str:
    """The unit an update must carry whole: the module (weight + bias), fused projections merged."""
    module = name.rpartition(".")[0]
    for group in _FUSED_GROUPS:
        for member in group:
            if module.endswith("." + member):
                return module[: -len(member)] + "+".join(group)
    return module


def validate_update(
    version: int,
    weights: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    tie_word_embeddings: bool = False,
) -> None:
    """Raises `EngineError` unless every tensor names a model parameter with the right shape.

    Also required: an int version >= 0, at least one tensor, floating-point tensors (cast to the
    engine's dtype when loaded), whole modules (weight and bias together; q/k/v and gate/up
    together), and in a model with tied embeddings an output layer equal to the input embedding.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise EngineError(f"policy version must be an int >= 0, got {version!r}")
    if not weights:
        raise EngineError("weight update is empty")
    problems = []
    for name, tensor in weights.items():
        if name not in expected:
            problems.append(f"unknown parameter {name!r}")
        elif not isinstance(tensor, torch.Tensor):
            problems.append(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        elif tuple(tensor.shape) != tuple(expected[name]):
            problems.append(f"{name}: shape {tuple(tensor.shape)} != model's {tuple(expected[name])}")
        elif not tensor.is_floating_point():
            problems.append(f"{name}: dtype {tensor.dtype} is not floating point")
    if not problems:
        touched = {_group_key(n) for n in weights}
        for name in expected:
            if _group_key(name) in touched and name not in weights:
                problems.append(f"{name} missing: parameters of one module (and q/k/v, gate/up) update together")
    if not problems and tie_word_embeddings:
        # One tensor in a tied model: vLLM keeps the embedding, transformers the last one copied.
        heads = [n for n in weights if is_tied_lm_head(n, True)]
        embeds = [n for n in weights if n.endswith("embed_tokens.weight")]
        if heads and embeds and not torch.equal(weights[heads[0]], weights[embeds[0]]):
            problems.append(f"{heads[0]} differs from {embeds[0]} but the model ties them")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise EngineError(f"weight update v{version} refused, weights unchanged: {shown}")


def is_tied_lm_head(name: str, tie_word_embeddings: bool) -> bool:
    """True for the output layer of a model whose output layer is its input embedding."""
    return tie_word_embeddings and re.fullmatch(r"(model\.)?lm_head\.weight", name) is not None
