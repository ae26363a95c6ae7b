"""An inference engine in a Ray actor of its own, with the engine end of weight sync.

Rollout workers own their engine directly; this host is for what needs an engine without
browsers: the GPU loop benchmark (recorded/synthetic episodes on a machine without Chromium),
throughput benchmarks and weight-sync tests. Placement (which GPU) is decided by the caller's
`.options(num_gpus=..., scheduling_strategy=...)`; the host never guesses.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ray

from actors.engine import ChatRequest, Generation, SamplingSettings
from actors.engines import create_engine
from actors.engines.config import EngineConfig
from weightsync import Receivers, WeightUpdate


class EngineHost:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = create_engine(config)
        self._receivers = Receivers(self.engine)

    def generate(self, requests: Sequence[ChatRequest], sampling: SamplingSettings) -> list[Generation]:
        return self.engine.generate(requests, sampling)

    def policy_version(self) -> int:
        return self.engine.policy_version

    def connect_weight_sync(self, kind: str, init: Mapping[str, Any]) -> None:
        """Joins the learner's end of weight-sync strategy `kind` (weightsync/)."""
        self._receivers.connect(kind, init)

    def receive_weights(self, update: WeightUpdate) -> int:
        """Receives and loads one version; returns the engine's version."""
        return self._receivers.receive(update)

    def weight_sync_stats(self, kind: str) -> dict:
        """What the last receive through `kind` measured (seconds): benchmarks read it."""
        return dict(self._receivers.get(kind).last_stats)

    def weight_sync_probe(self, kind: str, repeats: int = 3) -> dict:
        """The engine's end of a raw link probe (see NcclWeightSender.probe)."""
        return self._receivers.get(kind).probe(repeats)

    def weight_digest(self) -> dict[str, str]:
        return self.engine.weight_digest()

    def close(self) -> None:
        self.engine.close()


EngineHostActor = ray.remote(EngineHost)
