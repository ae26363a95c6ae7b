"""`bgrpo train`'s arguments (`parse_cli`) and its `--help` text, which lists every field of the tree
with its type, default and docstring (docs/configuration.md is that output)."""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from pydantic import ConfigDict, TypeAdapter

from cluster.config.checks import validate_config
from cluster.config.env_vars import ENV_OVERRIDES, ENV_REFUSED, ENV_REMOTE_SERVERS
from cluster.config.loader import DERIVED, build_config
from cluster.config.schema import ConfigError, TrainConfig

# --- help ------------------------------------------------------------------------------------------


def _schema_defs(cls: type) -> dict[str, Any]:
    """pydantic's JSON schema of every dataclass under `cls`, by class name. The list wrapper takes
    the config that turns each field's docstring into its description (a dataclass with a config of
    its own, like TrainConfig, keeps it)."""
    schema = TypeAdapter(list[cls], config=ConfigDict(use_attribute_docstrings=True)).json_schema()
    return schema["$defs"]


def _docs(defs: dict[str, Any], cls: type) -> dict[str, str]:
    props = defs[cls.__name__].get("properties", {})
    return {name: " ".join(p["description"].split()) for name, p in props.items() if "description" in p}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (`name: type = x` then `\"\"\"doc\"\"\"`)."""
    return _docs(_schema_defs(cls), cls)


def iter_fields(cls: type = TrainConfig, prefix: str = "", defs: dict | None = None) -> Iterator[tuple]:
    """(dotted name, type, default, docstring) for every leaf field of the tree."""
    defs = _schema_defs(cls) if defs is None else defs
    hints = typing.get_type_hints(cls)
    docs = _docs(defs, cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.", defs)
        else:
            yield f"{prefix}{f.name}", tp, getattr(instance, f.name), docs.get(f.name, "")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _derived_source(name: str) -> str | None:
    """The field a derived field (loader.DERIVED, or a field inside a derived section) comes from."""
    for target, source in DERIVED.items():
        if name == target or name.startswith(target + "."):
            return source + name[len(target):]
    return None


def help_text() -> str:
    lines = ["Config fields (set with --<name> VALUE; values are YAML: 1e-6, true, [a, b]):", ""]
    for name, tp, default, doc in iter_fields():
        source = _derived_source(name)
        value = f"derived from {source}, not set directly" if source else f"default {default!r}"
        lines.append(f"  --{name} ({_type_name(tp)}, {value})")
        if doc:
            lines.extend("      " + ln for ln in textwrap.wrap(doc, 92))
    lines += ["", "Environment variables (the seed gist's names) override the preset:"]
    lines += [f"  {var:<30} -> {path}" for var, path in ENV_OVERRIDES.items()]
    lines += [f"  {ENV_REMOTE_SERVERS:<30} -> cluster.env_server_urls (comma-separated) + cluster.env_placement remote"]
    lines += [f"  {var:<30} refused: {why}" for var, why in ENV_REFUSED.items()]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------

@dataclass
class CommandLine:
    """What `bgrpo train` was asked to do."""

    config: TrainConfig
    preset: str
    resume: str | None = None
    help: bool = False
    dry_run: bool = False
    """--dry-run: validate, print `resolved_yaml(config)` and exit without starting Ray."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What `bgrpo train` states before it starts (on --resume: an ignored --config, and every
    field an override or environment variable changes from the run folder's config)."""


def parse_cli(argv: list[str], environ: Mapping[str, str] | None = None) -> CommandLine:
    """`--config NAME|PATH [--resume RUN_DIR] [--dry-run] [--a.b VALUE | --a.b=VALUE ...] [--help]`.

    With --resume, the run folder's resolved config is the base, so a resumed run continues with
    exactly the settings it started with: a --config given too is ignored (`make run` always passes
    `--config local`), and every field that an override or environment variable changes is stated
    in `notes`.
    """
    preset: str | None = None
    resume: str | None = None
    overrides: dict[str, str] = {}
    args = list(argv)
    dry_run = "--dry-run" in args  # the one flag without a value
    args = [a for a in args if a != "--dry-run"]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            return CommandLine(config=TrainConfig(), preset=preset or "local", help=True)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --config local or --learner.lr 1e-6")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if key == "config":
            preset = value
        elif key == "resume":
            resume = value
        else:
            if key in overrides:
                raise ConfigError(f"--{key} given twice")
            overrides[key] = value
    notes: list[str] = []
    if resume is not None:
        config, notes = _resumed_config(resume, preset, overrides, environ)
    else:
        config = build_config(preset or "local", overrides, environ)
    validate_config(config)
    return CommandLine(config=config, preset=preset or ("resume" if resume else "local"), resume=resume,
                       dry_run=dry_run, notes=notes)


def _resumed_config(resume: str, preset: str | None, overrides: dict[str, str],
                    environ: Mapping[str, str] | None) -> tuple[TrainConfig, list[str]]:
    """The run folder's config.yaml with the overrides on top, and the notes that state them."""
    from cluster.config.loader import to_dict

    resolved = Path(resume) / "config.yaml"
    if not resolved.is_file():
        raise ConfigError(f"--resume {resume}: no config.yaml there (not a run folder?)")
    notes = []
    if preset is not None:
        notes.append(f"--config {preset} ignored: a resumed run continues with its own configuration "
                     f"({resolved})")
    saved = _flat(to_dict(build_config(str(resolved), {}, environ={})))
    config = build_config(str(resolved), dict(overrides), environ)
    config.cluster.run_dir = str(Path(resume))
    for name, value in _flat(to_dict(config)).items():
        if name == "cluster.run_dir" or _derived_source(name):  # derived fields follow their source
            continue
        if saved.get(name, MISSING_VALUE) != value:
            notes.append(f"--resume: {name} changed from the run's {saved.get(name)!r} to {value!r} "
                         "(a command-line override or environment variable)")
    return config, notes


MISSING_VALUE = object()


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted field -> value, down to the leaves of the config's sections (a mapping-valued field,
    e.g. cluster.env_server_tasks, stays one value)."""
    from cluster.config.tree import field_type_at

    out: dict[str, Any] = {}
    for key, value in tree.items():
        if dataclasses.is_dataclass(field_type_at(f"{prefix}{key}")):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


