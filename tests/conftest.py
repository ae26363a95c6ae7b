"""Shared fixtures, one plugin module per layer (so the layers never edit the same file).

- tests/fixtures/ray_cluster.py: one session-scoped local Ray cluster for every Ray test
- tests/fixtures/models.py: tiny offline models, built once per session
- tests/fixtures/engines.py: one vLLM engine on the tiny VLM, shared by the vLLM tests
- tests/fixtures/env.py: env-server pools (real Chromium) and the no-orphan check
- tests/fixtures/learner.py, tests/fixtures/rollout.py: per-layer fixtures
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.ray_cluster",
    "tests.fixtures.models",
    "tests.fixtures.engines",
    "tests.fixtures.env",
    "tests.fixtures.learner",
    "tests.fixtures.rollout",
]
