"""What crosses roles: the trajectory types and their Parquet schema (`core.trajectory`) and the
model/processor loading both the rollout side and the learner need (`core.processor`).

This package imports neither `actors/` nor `learner/` (tests/test_architecture.py checks it), so
both roles can depend on it without depending on each other.
"""
