"""An inference engine in a Ray actor of its own, with both weight-sync endpoints.

Rollout workers own their engine directly; this host is for what needs an engine without
browsers: the GPU loop benchmark (recorded/synthetic episodes on a machine without Chromium),
throughput benchmarks and weight-sync tests. Placement (which GPU) is decided by the caller's
`.options(num_gpus=..., scheduling_strategy=...)`; the host never guesses.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import ray

from actors.engine import ChatRequest, Generation, SamplingSettings
from actors.engines import create_engine
from actors.engines.config import EngineConfig


class EngineHost:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = create_engine(config)

    def generate(self, requests: Sequence[ChatRequest], sampling: SamplingSettings) -> list[Generation]:
        return self.engine.generate(requests, sampling)

    def policy_version(self) -> int:
        return self.engine.policy_version

    def update_weights_from_handle(self, handle: Any) -> dict:
        """Object-store path: fetch one published version (a `learner.weights.WeightHandle`) and load it."""
        t0 = time.perf_counter()
        weights = handle.fetch()
        t1 = time.perf_counter()
        self.engine.update_weights(handle.version, weights)
        return {"fetch_s": t1 - t0, "load_s": time.perf_counter() - t1, "version": self.engine.policy_version}

    def connect_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int,
                            layout: dict, timeout_s: float = 300.0) -> None:
        """Joins the learner's NCCL weight-sync group (vLLM backend only)."""
        self.engine.connect_weight_sync(host, port, rank_offset, world_size, layout, timeout_s)

    def update_weights_nccl(self, version: int, timeout_s: float = 60.0) -> dict:
        t0 = time.perf_counter()
        self.engine.update_weights_nccl(version, timeout_s)
        return {"receive_load_s": time.perf_counter() - t0, "version": self.engine.policy_version}

    def broadcast_probe(self, repeats: int = 3) -> dict:
        """The engine's end of a raw NCCL bandwidth probe (see NcclWeightSender.probe)."""
        return self.engine.weight_sync_probe(repeats)

    def weight_digest(self) -> dict[str, str]:
        return self.engine.weight_digest()

    def close(self) -> None:
        self.engine.close()


EngineHostActor = ray.remote(EngineHost)
