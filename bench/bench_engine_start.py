"""vLLM engine start, cold and warm: how long until a rollout engine can generate.

    python bench/bench_engine_start.py --shape qwen3-vl-2b --max-num-seqs 64      # GPU

Each start runs in a fresh process (as a rollout worker's engine does), in this order, all in one
run so the ratios compare like with like:
  1. cold: an empty compile-cache folder (torch.compile, Inductor and Triton all compile), CUDA
     graphs up to max_num_seqs (`engine.cudagraph_max_batch` unset: the project's default);
  2. warm: the same folder again (what every later run and every other worker on the node sees);
  3. with --capture-compare: warm, vLLM's own capture range (graphs up to 2 x max_num_seqs, at
     most 512): what the limit saves.
Each start ends with one generate call with a screenshot (VL shapes), so "ready" means ready.
Prints one line per start with vLLM's own breakdown (weights, compile, graph capture, the whole
engine initialisation) and writes the figures as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
# vLLM's log lines that say where start-up time went (0.24 and 0.32 wording).
PHASES = {
    "weights_s": r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) seconds",
    "compile_s": r"init engine \(profile, create kv cache, warmup model\) took [\d.]+ s \(compilation: ([\d.]+) s",
    "graph_capture_s": r"Graph capturing finished in ([\d.]+) secs",
    "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
}


def child(args: argparse.Namespace) -> None:
    """One engine start in this process; prints a JSON line."""
    sys.path.insert(0, str(REPO))
    start = time.perf_counter()
    from actors.engine import ChatRequest, SamplingSettings
    from actors.engines import EngineConfig, create_engine
    from bench.bench_engines import SCREENSHOT, model_for

    model = model_for(args.shape, None)
    built = time.perf_counter()
    engine = create_engine(EngineConfig(
        model=str(model), backend="vllm", dtype="bfloat16", max_model_len=4096, max_num_seqs=args.max_num_seqs,
        enforce_eager=False, compile_cache_dir=args.cache, cudagraph_max_batch=args.capture or None))
    ready = time.perf_counter()
    content = [{"type": "image"}, {"type": "text", "text": "Click the button."}] if args.shape != "tiny-text" else "Hi"
    request = ChatRequest(messages=[{"role": "user", "content": content}],
                          images=[SCREENSHOT.read_bytes()] if args.shape != "tiny-text" else [])
    engine.generate([request], SamplingSettings(temperature=1.0, max_new_tokens=8, seed=0))
    first = time.perf_counter()
    engine.close()
    print("RESULT " + json.dumps({"engine_start_s": ready - built, "first_generate_s": first - ready,
                                  "model_build_s": built - start}), flush=True)


def one_start(args: argparse.Namespace, name: str, cache: str, capture: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--max-num-seqs", str(args.max_num_seqs),
           "--cache", cache, "--capture", str(capture)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if args.log_dir:
        (pathlib.Path(args.log_dir) / f"start_{name}.log").write_text(log)
    result = next((json.loads(line[7:]) for line in log.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        raise SystemExit(f"{name}: the engine process failed (rc {proc.returncode}):\n{log[-3000:]}")
    for key, pattern in PHASES.items():
        found = [float(m) for m in re.findall(pattern, log)]
        result[key] = round(sum(found), 2) if found else None
    result.update(name=name, process_wall_s=round(wall, 1), capture_max=capture or 2 * args.max_num_seqs)
    print(f"{name:<26} engine start {result['engine_start_s']:6.1f}s (process {wall:6.1f}s) | weights "
          f"{result['weights_s']}s, compile {result['compile_s']}s, graph capture {result['graph_capture_s']}s, "
          f"engine init {result['engine_init_s']}s, first generate {result['first_generate_s']:.2f}s", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["tiny-text", "tiny-vl", "qwen3-vl-2b"], default="qwen3-vl-2b")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--log-dir", default="")
    parser.add_argument("--capture-compare", action="store_true",
                        help="a third start: warm, with vLLM's own capture range (up to 2 x max_num_seqs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    parser.add_argument("--capture", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    import torch

    cache = tempfile.mkdtemp(prefix="bgrpo-compile-cache-")  # empty: the cold start compiles everything
    vllm_default = min(2 * args.max_num_seqs, 512)
    runs = [one_start(args, "cold", cache, args.max_num_seqs),
            one_start(args, "warm", cache, args.max_num_seqs)]
    cold, warm = runs[0]["engine_start_s"], runs[1]["engine_start_s"]
    print(f"warm / cold engine start: {warm / cold:.2f} ({cold:.1f}s -> {warm:.1f}s)")
    if args.capture_compare:
        runs.append(one_start(args, "warm, vLLM capture range", cache, vllm_default))
        print(f"capture up to {args.max_num_seqs} vs {vllm_default}: {warm:.1f}s vs {runs[2]['engine_start_s']:.1f}s")
    if args.out:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        args.out.write_text(json.dumps({"shape": args.shape, "device": device, "max_num_seqs": args.max_num_seqs,
                                        "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
