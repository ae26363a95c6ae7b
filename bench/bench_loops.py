"""Sync vs async loop on the same preset and machine: learner idle fraction and trained samples/s.

    .venv/bin/python bench/bench_loops.py [--config local] [--steps 4] [--repeats 1] [--max-staleness 1] [--x.y VALUE ...]

Both runs use one fresh local Ray cluster, the same preset, seed and number of learner steps; only
`cluster.mode` differs. Printed per mode: wall time, trained episodes/s, learner idle fraction
(1 - time inside train_step / wall time from the first dispatch), and the async/sync ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(mode: str, args: argparse.Namespace, extra: list[str], root: Path) -> dict:
    from cluster import config as C
    from cluster import driver

    overrides = {
        "cluster.mode": mode, "cluster.total_steps": str(args.steps), "cluster.max_staleness": str(args.max_staleness),
        "cluster.run_dir": str(root / mode), "cluster.run_name": f"bench-{mode}", "eval.at_end": "false",
        "eval.every_steps": "0", "checkpoint.every_steps": "0", "checkpoint.save_final": "false",
        "logging.progress_bar": "false", "logging.plots": "false",
    }
    cl = C.parse_cli(["--config", args.config, *[f"--{k}={v}" for k, v in overrides.items()], *extra])
    t0 = time.monotonic()
    summary = driver.train(cl.config, root / mode)
    wall = summary["train_wall_s"]  # first dispatch -> last learner step (drain and eval excluded)
    return {
        "mode": mode,
        "total_s": time.monotonic() - t0,
        "loop_wall_s": wall,
        "trained_episodes": summary["accounting"]["trained"],
        "samples_per_s": summary["accounting"]["trained"] / wall,
        "learner_busy_s": summary["learner_busy_s"],
        "learner_idle_frac": 1.0 - summary["learner_busy_s"] / wall,
        "dropped": summary["accounting"]["dropped"],
        "max_lag": max((s["learner_version"] - s["min_token_version"] for s in summary["trained_steps"]), default=0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="local")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run sync, async, sync, async, ... and sum over the repeats (machine-load drift hits both)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args, extra = parser.parse_known_args(argv)

    import ray

    from cluster import config as C

    base = C.parse_cli(["--config", args.config, *extra]).config
    ray.init(address="local", num_cpus=base.cluster.num_cpus or None, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        with tempfile.TemporaryDirectory(prefix="bgrpo-bench-") as tmp:
            runs = [run(mode, args, extra, Path(tmp) / str(i)) for i in range(args.repeats) for mode in ("sync", "async")]
    finally:
        ray.shutdown()
    results = []
    for mode in ("sync", "async"):
        mine = [r for r in runs if r["mode"] == mode]
        wall = sum(r["loop_wall_s"] for r in mine)
        trained = sum(r["trained_episodes"] for r in mine)
        busy = sum(r["learner_busy_s"] for r in mine)
        results.append({"mode": mode, "loop_wall_s": wall, "trained_episodes": trained, "samples_per_s": trained / wall,
                        "learner_idle_frac": 1.0 - busy / wall, "max_lag": max(r["max_lag"] for r in mine)})
    sync, async_ = results
    print(f"\npreset {args.config} {' '.join(extra)}, {args.steps} learner steps x {args.repeats} repeat(s), "
          f"max_staleness {args.max_staleness}")
    print(f"{'mode':<6} {'loop wall s':>11} {'trained eps':>11} {'samples/s':>10} {'learner idle':>12} {'max lag':>7}")
    for r in results:
        print(f"{r['mode']:<6} {r['loop_wall_s']:>11.1f} {r['trained_episodes']:>11d} {r['samples_per_s']:>10.3f} "
              f"{r['learner_idle_frac']:>12.3f} {r['max_lag']:>7d}")
    ratio_samples = async_["samples_per_s"] / sync["samples_per_s"]
    ratio_idle = async_["learner_idle_frac"] / sync["learner_idle_frac"] if sync["learner_idle_frac"] else float("nan")
    print(f"async/sync trained samples/s ratio: {ratio_samples:.2f}x")
    print(f"async/sync learner idle fraction ratio: {ratio_idle:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "results": results, "samples_ratio": ratio_samples,
                                              "idle_ratio": ratio_idle}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
