"""Inference-engine backends behind `actors.engine.InferenceEngine`; pick one with `create_engine`.

Backends import lazily: the transformers engine never imports vLLM, and importing this package is
cheap.
"""

from __future__ import annotations

from actors.engine import InferenceEngine
from actors.engines.config import EngineConfig


def create_engine(config: EngineConfig) -> InferenceEngine:
    """Builds the engine `config.backend` names ("vllm" or "transformers")."""
    config.validate()
    if config.backend == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    from actors.engines.hf_engine import HFEngine

    return HFEngine(config)


__all__ = ["EngineConfig", "create_engine"]
