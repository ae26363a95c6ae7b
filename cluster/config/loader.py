"""From presets, environment variables and dotted overrides to one checked `TrainConfig`.

Precedence, lowest first: dataclass defaults < preset YAML (`--config NAME|PATH`) < the seed gist's
environment variables (`ENV_OVERRIDES`) < dotted command-line overrides (`--learner.lr 1e-6`). The
layers are merged as a plain tree; pydantic then checks and converts the whole tree against the
dataclasses' annotations in one pass, and its errors are reworded to name the field.

Derived fields (`DERIVED`: the learner's copy of the model path, seed, steps, the sampling settings
it scores with, ...) are not options: `derive` computes them once from their source after the tree
is read, and a tree that sets one apart from its source is refused with the source to set instead.
A resolved config (a run folder's config.yaml) holds them with their values; they are dropped on
reading when they agree with the file's own sources, so an override of a source is no conflict.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import TypeAdapter, ValidationError

from cluster.config.env_vars import apply_env_overrides
from cluster.config.schema import ConfigError, TrainConfig
from cluster.config.tree import (
    MISSING, did_you_mean, field_type_at, get_dotted, lookup, merge, parse_value, pop_dotted, set_dotted,
)

# Package data (pyproject's package-data), so presets are found by name from an installed package too.
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

_ADAPTER = TypeAdapter(TrainConfig)

# Fields of other layers' configs that are computed from one source of truth, so they cannot
# disagree: target -> source. The learner scores with the distribution the engine samples from
# (learner/logprobs.py), and dr_grpo normalises by the generation limit (TRL's max_completion_length).
DERIVED: dict[str, str] = {
    "grpo.temperature": "rollout.sampling.temperature",
    "grpo.top_k": "rollout.sampling.top_k",
    "grpo.top_p": "rollout.sampling.top_p",
    "grpo.max_completion_length": "rollout.sampling.max_new_tokens",
    "learner.model_path": "model",
    "learner.grpo": "grpo",
    "learner.total_steps": "cluster.total_steps",
    "learner.num_ranks": "cluster.learner_num_ranks",
    "learner.seed": "cluster.seed",
    "learner.keep_checkpoints": "checkpoint.keep_last",
    "learner.release_memory_after_step": "cluster.colocate",
    "learner.device": "cluster.learner_num_gpus",
    "engine.model": "model",
    "engine.seed": "cluster.seed",
    "env.max_steps": "rollout.max_steps",
    # The env server captures a screenshot only when the prompt shows it (text-only models: none,
    # ~70 ms less per reset and step); the viewer shows the prompt's images, so nothing else reads it.
    "env.include_screenshot": "rollout.prompt.include_screenshot",
}
KEEP_ALL = 1_000_000  # checkpoint.keep_last 0 = keep all
# The derived values that are not plain copies of their source.
_DERIVE_HOW = {
    "learner.keep_checkpoints": lambda keep_last: keep_last or KEEP_ALL,
    "learner.device": lambda gpus: "cuda" if gpus > 0 else "cpu",
}


def derive(config: TrainConfig) -> TrainConfig:
    """Sets every DERIVED target from its source (in place; `learner.grpo` is the `grpo` object)."""
    for target, source in DERIVED.items():
        section, _, name = target.rpartition(".")
        value = get_dotted(config, source)
        setattr(get_dotted(config, section), name, _DERIVE_HOW.get(target, lambda v: v)(value))
    return config


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data (dicts, lists, scalars) from a config tree or sub-config."""
    return TypeAdapter(type(obj)).dump_python(obj, mode="json")


# --- presets ---------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict:
    """The preset's mapping: a path to a YAML file, or a name looked up in PRESETS_DIR."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
    else:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections, got {type(data).__name__}")
    return data


# --- the tree to a checked config ------------------------------------------------------------------


def build_config(
    preset: str | None = "local",
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TrainConfig:
    """Preset < env vars (ENV_OVERRIDES) < dotted overrides (strings, parsed as YAML and checked)."""
    tree = load_preset(preset) if preset else {}
    _drop_consistent_derived(tree)
    apply_env_overrides(tree, os.environ if environ is None else environ)
    for dotted, text in (overrides or {}).items():
        tp = field_type_at(dotted)
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"--{dotted} is a section; set its fields, e.g. --{dotted}.<field> VALUE")
        set_dotted(tree, dotted, parse_value(text, tp) if isinstance(text, str) else text)
    explicit = {t: v for t in DERIVED if (v := pop_dotted(tree, t)) is not MISSING}
    config = derive(_validate_tree(tree))
    for target, value in explicit.items():
        derived = _plain(get_dotted(config, target))
        if value != derived:
            source = DERIVED[target]
            raise ConfigError(f"{target} is derived from {source}; set {source} instead "
                              f"(got {value!r} vs {derived!r})")
    return config


def _drop_consistent_derived(tree: dict) -> None:
    """A resolved config (run_dir/config.yaml) holds the derived values too; drop those that agree
    with the file's own sources, so an override of a source (e.g. on --resume) is not a conflict.
    The others stay, and `build_config` refuses them with the source to set."""
    if all(lookup(tree, t) is MISSING for t in DERIVED):
        return  # a preset: no derived values (the common case, no second pass)
    rest = copy.deepcopy(tree)
    for target in DERIVED:
        pop_dotted(rest, target)
    config = derive(_validate_tree(rest))
    for target in DERIVED:
        if lookup(tree, target) == _plain(get_dotted(config, target)):
            pop_dotted(tree, target)


def _plain(value: Any) -> Any:
    return to_dict(value) if dataclasses.is_dataclass(value) else value


def _validate_tree(tree: Mapping) -> TrainConfig:
    """pydantic's check of the whole tree over the defaults (a partial section keeps the defaults
    of the section's default value, e.g. rollout.sampling's temperature 0.5, not the class's)."""
    try:
        return _ADAPTER.validate_python(merge(to_dict(TrainConfig()), tree))
    except ValidationError as e:
        raise ConfigError(_reword(e.errors()[0])) from None


def _reword(error: Mapping[str, Any]) -> str:
    """One pydantic error as "<dotted field>: what is wrong, got <value>"."""
    path, cls = "", TrainConfig
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        fields = getattr(cls, "__dataclass_fields__", None)
        if fields is None and typing.get_origin(cls) is dict:  # a key of a mapping field
            path, cls = f"{path}.{part}", typing.get_args(cls)[1]
            continue
        if fields is None or part not in fields:
            if error["type"] == "unexpected_keyword_argument":
                full = f"{path}.{part}" if path else part
                return (f"unknown config key {full!r}{did_you_mean(part, list(fields or []), path)}; "
                        f"known keys: {', '.join(fields or [])}")
            break  # a union member's name (e.g. 'int' of int | None), not a field
        path = f"{path}.{part}" if path else part
        cls = field_type_at(path)
    value, kind = error.get("input"), error["type"]
    expected = _EXPECTED.get(kind.split("_")[0])
    if kind == "literal_error":
        choices = error["ctx"]["expected"].replace(" or ", ", ")
        return f"{path}: {value!r} is not one of [{choices}]"
    if expected:
        return f"{path}: expected {expected}, got {value!r}"
    return f"{path}: {error['msg']}, got {value!r}"


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true/false", "string": "a string",
             "list": "a list", "tuple": "a list", "dict": "a mapping", "dataclass": "a mapping of fields"}


# --- the resolved config ---------------------------------------------------------------------------


def resolved_yaml(config: TrainConfig) -> str:
    """The resolved configuration as YAML, derived fields included: what `bgrpo train --dry-run`
    prints and what a run saves as `<run_dir>/config.yaml`."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Writes the resolved config as YAML (atomically) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(resolved_yaml(config))
    os.replace(tmp, path)
    return path


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Reads a resolved config written by `save_config` (e.g. from a run folder to resume)."""
    return build_config(str(path), {}, environ={})
