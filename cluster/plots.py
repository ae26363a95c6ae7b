"""PNG plots of a run from its metrics.jsonl: reward, success rate, throughput.

    bgrpo plot RUN_DIR      (re)draw the plots of a run, finished or still running
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cluster.metrics import read_metrics

# file name -> (title, y label, [(record key, legend label), ...])
PLOTS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "reward.png": ("Episode return", "mean return", [("reward_mean", "train (trained groups)")]),
    "success_rate.png": (
        "Success rate",
        "fraction of episodes",
        [("success_rate", "train (sampled)"), ("eval_success_rate", "eval (held-out seeds)")],
    ),
    "throughput.png": (
        "Throughput",
        "per second",
        [("samples_per_s", "trained episodes/s"), ("env_steps_per_s", "env steps/s")],
    ),
    "timing.png": (
        "Where the time goes (per learner step)",
        "seconds",
        [("collect_s", "waiting for groups"), ("learner_step_s", "train step"), ("weight_sync_s", "weight sync")],
    ),
}


def write_plots(run_dir: str | os.PathLike) -> list[Path]:
    """Draws every plot that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in read_metrics(run_dir) if "step" in r]
    written: list[Path] = []
    for filename, (title, ylabel, series) in PLOTS.items():
        lines = []
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                lines.append((label, pts))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for label, pts in lines:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = run_dir / filename
        tmp = out.with_name(out.name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bgrpo plot", description="Draw the PNG plots of a run folder.")
    parser.add_argument("run_dir", help="a run folder containing metrics.jsonl")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"bgrpo plot: {run_dir} has no metrics.jsonl (not a run folder?)")
        return 2
    written = write_plots(run_dir)
    if not written:
        print(f"bgrpo plot: {run_dir}/metrics.jsonl has no step records yet")
        return 1
    for path in written:
        print(path)
    return 0
