"""The configuration as a plain tree (nested dicts from YAML): dotted paths into it, and command-line
or environment strings turned into values. Types and values are checked later, by pydantic, on the
whole tree (cluster/config/loader.py)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, Mapping

import yaml

from cluster.config.schema import ConfigError, TrainConfig


def field_type_at(path: str) -> Any:
    """The annotation of the field at dotted `path` in TrainConfig, or ConfigError with a suggestion."""
    cls: Any = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key {path!r}: {'.'.join(parts[:i])} has no sub-fields")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"unknown config key {path!r}{did_you_mean(part, list(hints), '.'.join(parts[:i]))}")
        cls = hints[part]
    return cls


def did_you_mean(name: str, names: list[str], prefix: str) -> str:
    """' (did you mean prefix.closest?)' or ''."""
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {(prefix + '.' if prefix else '') + close[0]}?)" if close else ""


def get_dotted(obj: Any, path: str) -> Any:
    """The attribute at dotted `path` of a config object."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


MISSING = object()


def lookup(tree: Mapping, path: str, default: Any = MISSING) -> Any:
    """The value at dotted `path` of a plain tree, or `default`."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(tree: dict, path: str, value: Any) -> None:
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {path!r}: {part} is not a section")
    node[parts[-1]] = value


def pop_dotted(tree: dict, path: str) -> Any:
    """Removes and returns the value at dotted `path` (`MISSING` when absent)."""
    section, _, name = path.rpartition(".")
    parent = lookup(tree, section) if section else tree
    return parent.pop(name, MISSING) if isinstance(parent, dict) else MISSING


def merge(base: Mapping, update: Mapping) -> dict:
    """`update` over `base`, section by section (a partial section keeps the base's other fields)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _is_text(tp: Any) -> bool:
    """A string field, or a choice among strings: its command-line text is the value as given."""
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def parse_value(text: str, tp: Any) -> Any:
    """A command-line or env-var string as YAML (so 1e-6, true, [a, b] work), kept a string for
    string fields so a run name like "007" is not turned into 7. For a list field, a plain string is
    a comma-separated list (TASKS=click-test,click-button)."""
    if _is_text(tp):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and typing.get_origin(tp) in (list, tuple):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value
