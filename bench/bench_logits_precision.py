"""How much float32 completion logits (`learner.fp32_logits`) narrow the spread of the
importance ratio, against bf16 logits cast up.

The importance ratio of a token is exp(learner logprob - engine logprob). Its spread comes from
the policy moving (async) and from numerical noise on both sides. This measures the learner's
share of the noise: the same weights, the same batch, scored three ways under the Learner's own
scoring path (`Learner.score`):
    reference  float32 forward, float32 logits
    fp32-head  bf16 autocast forward, lm_head applied in float32 to the completion positions
    bf16-head  bf16 autocast forward, bf16 logits (cast up for the log-softmax)
and reports, per variant, the per-token ratio exp(variant - reference): its standard deviation
(of the log-ratio), its 1st/99th percentiles and the largest |log-ratio|, and the same for the
sequence-level ratio (sum over a completion's tokens, what `sequence_*` correction modes use).
The ratio of the bf16-head spread to the fp32-head spread is the result.

    # one GPU, a random-initialised model of Qwen3-VL-2B-Instruct's exact shape (no download)
    python bench/bench_logits_precision.py --shape qwen3-vl-2b --device cuda
    # CPU smoke run on the tiny VL model (bf16 autocast on CPU)
    .venv/bin/python bench/bench_logits_precision.py

Random weights give logits of realistic scale (std ~1 at the 2B shape's init) but random
completion tokens; a trained model's peaked distributions may differ.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.bench_learner import QWEN3_VL_2B_SPECIAL_IDS, build_model, make_groups, qwen3_vl_2b_folder  # noqa: E402


def spread(log_ratios: list[float]) -> dict[str, float]:
    t = torch.tensor(log_ratios, dtype=torch.float64)
    r = t.exp()
    return {
        "log_ratio_std": float(t.std()) if t.numel() > 1 else 0.0,
        "ratio_p01": float(torch.quantile(r, 0.01)),
        "ratio_p99": float(torch.quantile(r, 0.99)),
        "max_abs_log_ratio": float(t.abs().max()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["tiny-vl", "qwen3-vl-2b"], default="tiny-vl")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=16, help="samples (one-step episodes)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens incl. image tokens")
    p.add_argument("--completion-len", type=int, default=16)
    p.add_argument("--image-width", type=int, default=498)
    p.add_argument("--image-height", type=int, default=321)
    p.add_argument("--out", default="", help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from actors.tiny_models import build_tiny_vl_model
    from learner.config import LearnerConfig
    from learner.learner import Learner

    device = torch.device(args.device)
    model_path = qwen3_vl_2b_folder() if args.shape == "qwen3-vl-2b" else build_tiny_vl_model()
    torch.manual_seed(0)
    model = build_model(args.shape, model_path, device)
    learner = Learner(LearnerConfig(model_path=str(model_path), device=args.device,
                                    micro_batch_size=args.micro_batch_size, fp32_logits=True), model=model)
    vocab = learner.model.get_output_embeddings().weight.shape[0]
    special = set(QWEN3_VL_2B_SPECIAL_IDS.values()) | set(learner.placeholder_ids)
    groups, _ = make_groups(args, vocab, learner.vision, special)
    return report(args, score_variants(learner, groups, device))


def score_variants(learner, groups, device: torch.device) -> dict[str, dict]:
    """The spreads of each variant's logprobs against the float32 reference, per token and per
    sequence (see the module docstring)."""
    head = learner.model.get_output_embeddings()
    fp32_forward = head.forward

    def score(autocast: bool, fp32_head: bool) -> dict:
        # Learner._autocast is bf16 on CUDA only; here both devices get it for the variants.
        learner._autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else (
            lambda: torch.autocast(device.type, enabled=False))
        if fp32_head:
            head.forward = fp32_forward
        else:
            del head.forward  # the class's forward: bf16 under autocast
        return learner.score(groups)

    reference = score(autocast=False, fp32_head=True)
    rows = {}
    for name, fp32_head in (("fp32-head", True), ("bf16-head", False)):
        scored = score(autocast=True, fp32_head=fp32_head)
        tokens, seqs = [], []
        for key, ref in reference.items():
            d = [a - b for a, b in zip(scored[key], ref)]
            tokens.extend(d)
            seqs.append(sum(d))
        rows[name] = {"token": spread(tokens), "sequence": spread(seqs), "tokens": len(tokens)}
    return rows


def report(args: argparse.Namespace, rows: dict[str, dict]) -> int:
    """Prints the spreads and their bf16 / fp32 ratio, writes --out; 1 on non-finite values."""
    ratio = rows["bf16-head"]["token"]["log_ratio_std"] / max(rows["fp32-head"]["token"]["log_ratio_std"], 1e-300)
    seq_ratio = rows["bf16-head"]["sequence"]["log_ratio_std"] / max(
        rows["fp32-head"]["sequence"]["log_ratio_std"], 1e-300)
    result = {"shape": args.shape, "device": args.device, "batch": args.batch, "prompt_len": args.prompt_len,
              "completion_len": args.completion_len, "variants": rows,
              "token_spread_bf16_over_fp32": ratio, "sequence_spread_bf16_over_fp32": seq_ratio}
    for name, r in rows.items():
        t, s = r["token"], r["sequence"]
        print(f"{name:10s} token log-ratio std {t['log_ratio_std']:.3e}  ratio p01-p99 "
              f"[{t['ratio_p01']:.5f}, {t['ratio_p99']:.5f}]  max|log| {t['max_abs_log_ratio']:.3e}  | "
              f"sequence std {s['log_ratio_std']:.3e} max|log| {s['max_abs_log_ratio']:.3e}")
    print(f"bf16 logits / fp32 logits spread of the per-token ratio: {ratio:.2f}x; per sequence: {seq_ratio:.2f}x")
    if not all(math.isfinite(v) for r in rows.values() for v in r["token"].values()):
        print("non-finite values: check the run", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
