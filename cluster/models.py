"""Model names the configs accept -> a folder or hub id to load (no Ray, no config import).

A module of its own so that the driver, `bgrpo eval`, `bgrpo sft` and `bgrpo demos` share it
without importing each other (tests/test_architecture.py: no import cycles).
"""

from __future__ import annotations


def resolve_model(name: str) -> str:
    """'tiny-vlm' / 'tiny-lm' -> the folder of the tiny model built offline; 'random-qwen3-vl-2b'
    -> a random-initialised model of Qwen3-VL-2B's exact shape, built offline (GPU smoke runs and
    benchmarks: the real sizes without a download); else as given."""
    if name == "random-qwen3-vl-2b":
        from actors.tiny_models import build_qwen3_vl_2b_shape

        return str(build_qwen3_vl_2b_shape())
    if name in ("tiny-vlm", "tiny-vl"):
        from actors.tiny_models import build_tiny_vl_model

        return str(build_tiny_vl_model())
    if name in ("smollm2-135m", "SmolLM2-135M-Instruct"):
        from actors.smollm2 import build_smollm2

        return str(build_smollm2())
    if name in ("tiny-lm", "tiny-text"):
        from actors.tiny_models import build_tiny_text_model

        return str(build_tiny_text_model())
    return name
