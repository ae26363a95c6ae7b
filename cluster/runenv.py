"""Where a run writes and what a local Ray's workers inherit (no Ray, no config import: the
driver and `bgrpo sft` share it without importing each other)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def new_run_dir(config: Any, preset: str) -> Path:
    """`cluster.run_dir`, else runs/<time>-<run name or preset>."""
    if config.cluster.run_dir:
        return Path(config.cluster.run_dir)
    name = config.cluster.run_name or Path(preset).stem
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def offline_env_vars() -> dict[str, str]:
    """The variables a local Ray's workers inherit (offline caches, the test Chromium)."""
    keep = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "BGRPO_CACHE_DIR", "BGRPO_CHROMIUM",
            "VLLM_CPU_KVCACHE_SPACE", "HF_HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
