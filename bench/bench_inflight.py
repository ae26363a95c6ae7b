"""Drained vs in-flight weight updates on one vLLM engine, in one run: the engine's idle time per
update, how long an update waits before it loads, and generation throughput across updates.

One engine generates batch after batch (B requests of up to T new tokens each) on one thread while
another thread loads U full-state-dict updates at fixed times (every `--interval` seconds from the
start of the window). The same engine runs both modes, switched between windows
(`VLLMEngine.weight_update`), interleaved drained, in_flight, drained, ... for `--repeats` rounds,
so both see the same machine. Per window: tokens/s over the window, and from the engine's own
accounting (actors/engines/update_gate.py): idle seconds per update (no token can be generated
because of the update), wait seconds per update (arrival to load), tokens prefilled again (in
flight only) and how many updates landed mid-call.

    python bench/bench_inflight.py                                   # tiny text model, CPU
    python bench/bench_inflight.py --shape qwen3-vl-2b --device cuda --image --batch 64 --interval 2

`--shape` and the request builder are bench/bench_engines.py's (`qwen3-vl-2b`: random weights of
Qwen3-VL-2B's exact shape, no download). Add `--out FILE.json` to keep the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.bench_engines import make_requests, model_for  # noqa: E402

MODES = ("drained", "in_flight")


def two_weight_sets(model_path: pathlib.Path) -> list[dict]:
    """The checkpoint's tensors and a perturbed copy: updates alternate between them, so every
    update changes the weights (a tied lm_head is not stored: the embedding carries it)."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(model_path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return [state, {n: t + 0.01 if t.is_floating_point() else t for n, t in state.items()}]


def run_window(engine, mode: str, requests, sampling, weights: list[dict], args) -> dict:
    """One measured window in `mode`: generate until U updates have loaded, then one more call."""
    engine.weight_update = mode
    before = engine.weight_update_stats()
    done = threading.Event()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def updater() -> None:
        try:
            for k in range(args.updates):
                time.sleep(max(0.0, start + (k + 1) * args.interval - time.perf_counter()))
                t0 = time.perf_counter()
                engine.update_weights(engine.policy_version + 1, weights[k % 2])
                latencies.append(time.perf_counter() - t0)
        except BaseException as err:  # noqa: BLE001 - reported after the window
            errors.append(err)
        finally:
            done.set()

    tokens = calls = 0
    start = time.perf_counter()
    thread = threading.Thread(target=updater)
    thread.start()
    while True:
        finished = done.is_set()
        tokens += sum(len(g.completion_ids) for g in engine.generate(requests, sampling))
        calls += 1
        if finished:
            break
    wall = time.perf_counter() - start
    thread.join()
    if errors:
        raise errors[0]
    after = engine.weight_update_stats()
    n = after["weight_updates"] - before.get("weight_updates", 0)
    return {
        "mode": mode, "wall_s": wall, "calls": calls, "tokens": tokens, "tokens_per_s": tokens / wall,
        "updates": n,
        "idle_s_per_update": (after["weight_update_idle_s"] - before.get("weight_update_idle_s", 0.0)) / n,
        "update_call_s_median": statistics.median(latencies),
        "mid_call": after["weight_updates_mid_call"] - before.get("weight_updates_mid_call", 0),
        "reprefill_tokens": after["weight_update_reprefill_tokens"] - before.get("weight_update_reprefill_tokens", 0),
    }


def summarize(windows: list[dict]) -> dict:
    """Per mode: medians over its windows; then in_flight / drained ratios."""
    out: dict = {}
    for mode in MODES:
        ws = [w for w in windows if w["mode"] == mode]
        out[mode] = {k: statistics.median(w[k] for w in ws)
                     for k in ("tokens_per_s", "idle_s_per_update", "update_call_s_median", "reprefill_tokens",
                               "mid_call", "updates")}
    d, f = out["drained"], out["in_flight"]
    out["ratio_in_flight_over_drained"] = {
        k: (f[k] / d[k] if d[k] else float("nan")) for k in ("tokens_per_s", "idle_s_per_update", "update_call_s_median")}
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["tiny-text", "tiny-vl", "qwen3-vl-2b"], default="tiny-text")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where vLLM runs (its build decides; this checks that it is the one you meant)")
    parser.add_argument("--image", action="store_true", help="one screenshot per request (VL shapes)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--updates", type=int, default=4, help="updates per window")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between updates")
    parser.add_argument("--repeats", type=int, default=2, help="windows per mode (interleaved)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", choices=["auto", "true", "false"], default="auto",
                        help="vLLM without CUDA graphs; auto = graphs on GPU, eager on CPU")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch

    from actors.engine import SamplingSettings
    from actors.engines import EngineConfig, create_engine

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    model_path = model_for(args.shape, args.cache_dir)
    eager = {"true": True, "false": False}.get(args.enforce_eager, args.device == "cpu")
    t0 = time.perf_counter()
    engine = create_engine(EngineConfig(model=str(model_path), backend="vllm", dtype=args.dtype,
                                        max_model_len=args.max_model_len, max_num_seqs=args.batch,
                                        enforce_eager=eager))
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"model {args.shape}, {device}, engine start {time.perf_counter() - t0:.1f}s; batch {args.batch} x "
          f"{args.max_new_tokens} new tokens, {args.updates} updates every {args.interval}s per window", flush=True)
    requests = make_requests(args.batch, args.image)
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=args.max_new_tokens)
    weights = two_weight_sets(model_path)
    engine.generate(requests, sampling)  # warm-up
    windows = []
    try:
        for _ in range(args.repeats):
            for mode in MODES:
                w = run_window(engine, mode, requests, sampling, weights, args)
                windows.append(w)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in w.items()}), flush=True)
    finally:
        engine.close()
    summary = summarize(windows)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                                        "windows": windows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
