"""`bgrpo demos`: the command line of the scripted-teacher demonstrations (actors/demos.py).

Here rather than in actors/ because it reads the training configuration (cluster/config.py) and
resolves model names (cluster/models.py): actors/ imports nothing from cluster/.
"""

from __future__ import annotations

import argparse
import logging
import sys

from actors.demos import collect_demonstrations, demo_instances

USAGE = "bgrpo demos: play scripted-teacher demonstrations on real MiniWoB tasks (Parquet + viewer)"


def main(argv: list[str] | None = None) -> int:
    """`bgrpo demos --model M --tasks T1,T2 --episodes N [--epsilon E] --out DIR`."""
    from cluster.config import ConfigError, build_config, normalize_task
    from cluster.models import resolve_model

    ap = argparse.ArgumentParser(prog="bgrpo demos", description=USAGE)
    ap.add_argument("--config", default="local", help="preset whose rollout/env/sampler settings to use")
    ap.add_argument("--model", default=None, help="model whose tokenizer/processor renders the prompts")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: the preset's sampler.tasks)")
    ap.add_argument("--episodes", type=int, default=16, help="episodes per task")
    ap.add_argument("--epsilon", type=float, default=0.0, help="probability of a random valid action per step")
    ap.add_argument("--sessions", type=int, default=2, help="env sessions (browsers) in parallel")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder (trajectories/ and viewer/ go there)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = build_config(args.config)
    except ConfigError as e:
        print(f"bgrpo demos: bad config: {e}", file=sys.stderr)
        return 2
    tasks = [normalize_task(t) for t in (args.tasks.split(",") if args.tasks else config.sampler.tasks)]
    model_path = resolve_model(args.model or config.model)
    instances = demo_instances(tasks, args.episodes, config.sampler.train_seeds, args.seed)
    _, summary = collect_demonstrations(model_path, instances, config.rollout, config.env, args.out,
                                        args.epsilon, args.sessions, args.seed)
    print(f"bgrpo demos: {summary.as_dict()} -> {args.out}", flush=True)
    return 0 if summary.episodes > summary.failed else 1
