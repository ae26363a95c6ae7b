"""Weight sync between the learner and the inference engines: one interface, one strategy per
transport, picked by name (`cluster.weight_sync`: object_store | nccl).

    sync = make_weight_sync(cfg.cluster.weight_sync, learner_rank0, workers,
                            timeout_s=cfg.cluster.weight_sync_timeout_s,
                            bucket_mb=cfg.cluster.weight_sync_bucket_mb)
    sync.setup()                 # once: NCCL forms its group; the object store needs nothing
    version = sync.sync()        # or pending = sync.send() ... version = sync.wait(pending)

The learner plugs its model in as a `WeightSource` and keeps a `Senders`; every engine host keeps
a `Receivers` over its engine (an `EngineTarget`). Modules: `base` (the interface and registry),
`registry` (strategy names -> ends), `object_store` (one immutable Ray object per version, numpy wire format), `nccl` (bucketed
broadcast from learner rank 0 into every vLLM worker). This package imports neither role.
"""

from weightsync.base import (
    EngineTarget,
    Pending,
    WeightReceiver,
    WeightSender,
    WeightSource,
    WeightSync,
    WeightSyncError,
    WeightUpdate,
)
from weightsync.registry import Receivers, Senders, make_weight_sync, strategy

__all__ = [
    "EngineTarget",
    "Pending",
    "Receivers",
    "Senders",
    "WeightReceiver",
    "WeightSender",
    "WeightSource",
    "WeightSync",
    "WeightSyncError",
    "WeightUpdate",
    "make_weight_sync",
    "strategy",
]
