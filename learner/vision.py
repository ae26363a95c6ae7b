"""The learner's vision-tower fast path for Qwen3-VL (transformers' implementation, pinned).

Profiling the 2B shape's training step on an H100 (README, "Learner") showed the GPU idle for half
of the step, waiting on the host. Two of the reasons are in transformers' Qwen3-VL vision tower:

1. With SDPA, every vision block splits the packed patch sequence per image with
   `lengths.tolist()` (a GPU->host sync in each of the 24 blocks) and runs one attention call per
   image: 8 images x 24 blocks = 192 small kernels forward, as many backward.
2. The tower derives the rotary position ids, the position-embedding interpolation taps and the
   per-image boundaries (`cu_seqlens`) from `image_grid_thw` on the GPU at every forward.

What this module does instead:

1. `enable_packed_vision_attention` points the vision config at one more transformers attention
   function, `packed_vision_attention`, registered through `AttentionInterface` (transformers'
   public extension point). Its name contains "flash" on purpose: that is how transformers
   routes the vision attention through its variable-length path, which hands the function the
   packed sequence with `cu_seqlens` and `max_seqlen` instead of splitting it. The function then
   runs all images as ONE batched SDPA call: a reshape when every image has the same size
   (MiniWoB screenshots do), else padded to the longest image with a key mask. No host sync.
2. `vision_precompute` computes those grid-derived tensors on the CPU, in the learner's
   collation thread, and the forward takes them as `image_*` keyword arguments: transformers'
   vision utilities (`transformers.vision_utils`) use a precomputed tensor when it is given.

Both give the same numbers as transformers' own path (tests/test_learner.py checks the
logprobs on images of mixed sizes). Only Qwen3-VL's vision attention is switched (the class
the tests cover); other models keep transformers' path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PACKED_VISION_ATTENTION = "bgrpo_flash_packed_sdpa"
"""The registered name ("flash" in it selects transformers' cu_seqlens path, see above)."""

# Vision-attention classes whose flash path calls the attention function with the packed
# sequence and `cu_seq_lens_q` / `max_length_q`, as `packed_vision_attention` expects.
_PACKABLE = ("Qwen3VLVisionAttention",)

# The keyword arguments `vision_precompute` produces: the model's forward passes them on to the
# vision tower (the `image_` prefix is stripped there), and ignores them elsewhere.
VISION_KWARGS = (
    "image_cu_seqlens", "image_max_seqlen", "image_position_ids", "image_interp_indices",
    "image_interp_weights",
)


def packed_vision_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention within each image of a packed sequence, one SDPA call.

    query/key/value: (1, heads, total_patches, head_dim), images one after the other;
    `cu_seq_lens_q`: (images + 1,) boundaries; `max_length_q`: the longest image (a Python int).
    Returns (1, total_patches, heads, head_dim), the layout transformers' attention functions
    return."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError(
            f"{PACKED_VISION_ATTENTION} serves the vision tower's packed (cu_seqlens) attention only"
        )
    _, heads, total, dim = query.shape
    n = cu_seq_lens_q.shape[0] - 1
    longest = int(max_length_q)
    if n * longest == total:
        # Every image the same size: the packed sequence is already (images, patches).
        q, k, v = (t[0].view(heads, n, longest, dim).transpose(0, 1) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).reshape(1, total, heads, dim), None

    # Mixed sizes: gather each image into a row padded to the longest one; padded keys are masked
    # out, padded queries are computed and dropped.
    cu = cu_seq_lens_q.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    slot = torch.arange(longest, device=query.device)
    rows = (starts[:, None] + slot[None, :]).clamp(max=total - 1)  # (n, longest) token index
    keep = slot[None, :] < lengths[:, None]  # (n, longest)
    q, k, v = (t[0][:, rows].transpose(0, 1) for t in (query, key, value))  # (n, heads, longest, dim)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=keep[:, None, None, :], dropout_p=dropout, scale=scaling
    )
    # Back to the packed order: token t sits in row image(t), slot t - start(image(t)).
    token = torch.arange(total, device=query.device)
    image = torch.searchsorted(cu[1:], token, right=True)
    flat = image * longest + (token - starts[image])
    out = out.transpose(1, 2).reshape(n * longest, heads, dim)[flat]
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_VISION_ATTENTION, packed_vision_attention)


def enable_packed_vision_attention(model: torch.nn.Module) -> int:
    """Switches the model's Qwen3-VL vision attention to `packed_vision_attention`; returns how
    many attention modules use it now (0: the model has no such vision tower, nothing changed)."""
    modules = [m for m in model.modules() if type(m).__name__ in _PACKABLE]
    if not modules:
        return 0
    _register()
    for m in modules:
        # The vision config object is shared by the tower's blocks (and only them): the text
        # model's attention keeps its own implementation.
        m.config._attn_implementation = PACKED_VISION_ATTENTION
    return len(modules)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The Qwen3-VL vision tower (`Qwen3VLVisionModel`) inside `model` (also LoRA-wrapped), if any."""
    for m in model.modules():
        if type(m).__name__ == "Qwen3VLVisionModel":
            return m
    return None


def vision_precompute(tower: torch.nn.Module, grid_thw: torch.Tensor) -> dict[str, Any]:
    """The vision tower's grid-derived inputs for `grid_thw` (computed where `grid_thw` lives:
    the CPU, in the collation thread), as the model's `image_*` keyword arguments."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw,
        num_grid_per_side=tower.num_grid_per_side,
        mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners,
        spatial_merge_size=tower.config.spatial_merge_size,
    )
    return {
        "image_cu_seqlens": cu_seqlens,
        "image_max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        "image_position_ids": get_vision_position_ids(grid_thw, tower.spatial_merge_size),
        "image_interp_indices": indices,
        "image_interp_weights": weights,
    }
