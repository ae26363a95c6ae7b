"""The root configuration: one dataclass tree, YAML presets, dotted CLI overrides, env-var overrides.

    TrainConfig
      cluster     ClusterConfig      (cluster.config.schema)  Ray address, workers, GPUs, placement, sync/async, steps
      env         EnvConfig          (envs.browsergym.config)
      rollout     RolloutConfig      (actors.config)
      engine      EngineConfig       (actors.engines.config)
      learner     LearnerConfig      (learner.config)
      grpo        GRPOConfig         (learner.config)
      logging     LoggingConfig      (cluster.config.schema)  metrics.jsonl, trackio / tensorboard / wandb, progress bar
      checkpoint  CheckpointConfig   (cluster.config.schema)  every N steps, keep last K
      eval        EvalConfig         (cluster.config.schema)  every N steps, held-out seeds, greedy
      sampler     SamplerConfig      (cluster.config.schema)  tasks, train vs eval seeds, success-rate weighting
      warm_start  WarmStartConfig    (cluster.config.schema)  supervised warm start before GRPO

    schema.py        the sub-configs cluster/ owns and the root, composed by static imports
    tree.py          dotted paths into the plain YAML tree; command-line strings to values
    env_vars.py      the seed gist's environment variables (honoured or refused)
    loader.py        presets (package data in cluster/presets/), layering, pydantic check, derived fields
    checks.py        validate_config: each section's validate() and the checks across sections
    command_line.py  parse_cli and the --help text

Why pydantic (v2, pinned in pyproject): the type checking and conversion of a nested tree of
dataclasses (int vs float, Literal choices, Optional, lists, tuples, dicts, unknown keys), dumping
back to plain data, and the field docstrings for --help are what pydantic's `TypeAdapter` does for
standard-library dataclasses, so this package no longer carries its own coercion, dict-to-dataclass
builder, serialiser or docstring parser. The sub-configs stay standard dataclasses (not
`BaseModel`s): every layer builds, copies and pickles them as such (Ray ships them to actors), and
they stay importable without the cluster's code. Only the error wording is ours (loader._reword),
so a bad value still names the dotted field, e.g. "cluster.total_steps: expected an integer".
"""

from cluster.config.checks import (
    check_teachers, miniwob_task_names, normalize_task, num_generations, validate_config, warm_start_tasks,
)
from cluster.config.command_line import CommandLine, field_docs, help_text, iter_fields, parse_cli
from cluster.config.env_vars import ENV_OVERRIDES, ENV_REFUSED, ENV_REMOTE_SERVERS, apply_env_overrides
from cluster.config.loader import (
    DERIVED, PRESETS_DIR, build_config, derive, load_config, load_preset, preset_names, resolved_yaml,
    save_config, to_dict,
)
from cluster.config.schema import (
    CheckpointConfig, ClusterConfig, ConfigError, EngineConfig, EnvConfig, EvalConfig, GRPOConfig,
    LearnerConfig, LoggingConfig, RolloutConfig, SamplerConfig, TrainConfig, WarmStartConfig,
)
from cluster.config.tree import field_type_at, get_dotted, parse_value

__all__ = [
    "DERIVED", "ENV_OVERRIDES", "ENV_REFUSED", "ENV_REMOTE_SERVERS", "PRESETS_DIR", "CheckpointConfig",
    "ClusterConfig", "CommandLine", "ConfigError", "EngineConfig", "EnvConfig", "EvalConfig", "GRPOConfig",
    "LearnerConfig", "LoggingConfig", "RolloutConfig", "SamplerConfig", "TrainConfig", "WarmStartConfig",
    "apply_env_overrides", "build_config", "check_teachers", "derive", "field_docs", "field_type_at",
    "get_dotted", "help_text", "iter_fields", "load_config", "load_preset", "miniwob_task_names",
    "normalize_task", "num_generations", "parse_cli", "parse_value", "preset_names", "resolved_yaml",
    "save_config", "to_dict", "validate_config", "warm_start_tasks",
]
