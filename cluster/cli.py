"""`bgrpo`: the console command. Each subcommand imports its module lazily so `--help` is instant.

    bgrpo train --config local [--learner.lr 1e-5 ...]   train (locally or inside `ray job submit`)
    bgrpo demos --out DIR [--tasks T] [--epsilon E]     scripted-teacher demonstrations (Parquet + viewer)
    bgrpo sft --config local                             supervised warm start -> a checkpoint `model:` can name
    bgrpo eval --config local --model CKPT               held-out success per task with 95 % intervals
    bgrpo env-server --task miniwob.click-test --port 8000 start one standalone OpenEnv server
    bgrpo demo                                           scripted MiniWoB episode through an env server
    bgrpo build-tiny-models                              build the offline tiny models into the cache
    bgrpo plot RUN_DIR                                   (re)draw the PNG plots of a run
    bgrpo cleanup RUN_DIR                                stop what a killed run left running
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

# name -> (help, "module:function"); the function takes the remaining argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train a policy (local Ray or inside a Ray job)", "cluster.driver:main"),
    "demos": ("play scripted-teacher demonstrations (Parquet + viewer)", "cluster.demos_cli:main"),
    "sft": ("supervised warm start on demonstrations; writes a checkpoint", "cluster.warm_start:main"),
    "eval": ("evaluate a model or checkpoint on held-out seeds (95 % intervals)", "cluster.eval:main"),
    "env-server": (
        "start one standalone BrowserGym OpenEnv server",
        "envs.browsergym.server.app:main",
    ),
    "demo": ("run a scripted MiniWoB episode end to end through an env server", "envs.browsergym.demo:main"),
    "build-tiny-models": ("build the tiny offline test models", "actors.tiny_models:main"),
    "plot": ("draw the PNG plots of a run folder", "cluster.plots:main"),
    "cleanup": ("stop the processes a killed run left running (Ray, env servers, Chromium)", "cluster.run_processes:main"),
}


def _load(target: str) -> Callable[[list[str]], int]:
    module_name, func_name = target.split(":")
    module = __import__(module_name, fromlist=[func_name])
    return getattr(module, func_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="bgrpo",
        description="GRPO for vision-language web agents on BrowserGym, on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `bgrpo <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, _) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text.replace("%", "%%"), add_help=False)  # argparse formats help with %
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    return int(_load(SUBCOMMANDS[name][1])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
