"""Tokens per second of the vLLM engine vs the transformers engine, and the time of one weight update.

Both engines run the same model on the same batch of chat requests (optionally with a MiniWoB
screenshot each) at each batch size; the ratio vLLM / transformers is printed for each. Then one
full weight update (the model's whole state dict, perturbed) is timed on each engine.

    python bench/bench_engines.py                       # tiny text model (CPU here)
    python bench/bench_engines.py --shape tiny-vl --image
    python bench/bench_engines.py --shape qwen3-vl-2b --image --batch-sizes 1,8,32,128   # GPU
    python bench/bench_engines.py --shape qwen3-vl-2b --backends vllm --image-compare --batch-sizes 64,256

`--shape qwen3-vl-2b` builds a random-initialised model with Qwen3-VL-2B-Instruct's exact shape
(config values below, no download) and the tiny tokenizer padded to the real vocabulary size.
Completion lengths differ per request (EOS), so throughput counts the tokens actually generated.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

SCREENSHOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "miniwob_click_button.png"


def model_for(shape: str, cache_dir: pathlib.Path | None) -> pathlib.Path:
    from actors import tiny_models

    if shape == "tiny-text":
        return tiny_models.build_tiny_text_model(cache_dir)
    if shape == "tiny-vl":
        return tiny_models.build_tiny_vl_model(cache_dir)
    return tiny_models.build_qwen3_vl_2b_shape(cache_dir)


def distinct_screenshots(n: int) -> list[bytes]:
    """n PNGs of the MiniWoB screenshot, each with one pixel changed: no two hash alike, so vLLM's
    multimodal processor cache cannot serve one request from another's (as in a real rollout,
    where only a group's first screenshot repeats)."""
    import io

    from PIL import Image

    base = Image.open(SCREENSHOT).convert("RGB")
    out = []
    for i in range(n):
        img = base.copy()
        img.putpixel((i % img.size[0], (i // img.size[0]) % img.size[1]), (i % 256, (i // 256) % 256, 7))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_requests(n: int, image: bool | str):
    """n chat requests; `image`: False (text only), True/"same" (the one screenshot in each) or
    "distinct" (`distinct_screenshots`)."""
    from actors.engine import ChatRequest

    pngs = distinct_screenshots(n) if image == "distinct" else [SCREENSHOT.read_bytes()] * n

    goals = ["click the submit button", "enter the text 'hello'", "select the third option", "close the dialog"]
    requests = []
    for i in range(n):
        text = f"Goal: {goals[i % len(goals)]}. Step {i}. [13] button 'submit' [14] link 'no'\nAction:"
        if image:
            content = [{"type": "image"}, {"type": "text", "text": text}]
            requests.append(ChatRequest(messages=[{"role": "user", "content": content}], images=[pngs[i]]))
        else:
            requests.append(ChatRequest(messages=[{"role": "user", "content": text}]))
    return requests


def time_generate(engine, requests, sampling, repeats: int) -> tuple[float, float]:
    """(median seconds per call, median generated tokens per second) after one warm-up call."""
    engine.generate(requests, sampling)  # warm-up: first call at a batch size is slow in vLLM
    seconds, rates = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        gens = engine.generate(requests, sampling)
        elapsed = time.perf_counter() - start
        seconds.append(elapsed)
        rates.append(sum(len(g.completion_ids) for g in gens) / elapsed)
    return statistics.median(seconds), statistics.median(rates)


def time_update(engine, model_path: pathlib.Path) -> tuple[float, float]:
    """(seconds for one full-state-dict update, MB sent)."""
    from safetensors.torch import load_file

    state = {}  # the checkpoint's tensors (a tied lm_head is not stored: the embedding carries it)
    for file in sorted(model_path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    weights = {n: t + 0.01 if t.is_floating_point() else t for n, t in state.items()}
    mb = sum(t.numel() * t.element_size() for t in weights.values()) / 1e6
    start = time.perf_counter()
    engine.update_weights(engine.policy_version + 1, weights)
    return time.perf_counter() - start, mb


def time_async_llm(model_path: pathlib.Path, requests, sampling, repeats: int, args) -> tuple[float, float]:
    """(median seconds, median tokens/s) of the same requests sent to vLLM's AsyncLLM as concurrent,
    independent requests (how per-episode submission would use it), after one warm-up round."""
    import asyncio
    import uuid

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from actors.engines.config import EngineConfig
    from actors.engines.processing import load_processor, render_prompt
    from actors.engines.vllm_engine import _llm_kwargs, _platform_is_cpu

    processor = load_processor(model_path)
    vision = hasattr(processor, "image_processor")
    config = EngineConfig(model=str(model_path), dtype=args.dtype, max_model_len=args.max_model_len,
                          max_num_seqs=len(requests))
    kwargs = _llm_kwargs(config, vision, _platform_is_cpu(), args.max_model_len)
    rendered = [render_prompt(processor, r) for r in requests]
    prompts = [
        {"prompt_token_ids": r.placeholder_ids, "multi_modal_data": {"image": r.images}} if r.images
        else {"prompt_token_ids": r.prompt_ids}
        for r in rendered
    ]

    async def one(engine, prompt, i) -> int:
        params = SamplingParams(temperature=sampling.temperature, max_tokens=sampling.max_new_tokens,
                                logprobs=0, seed=sampling.seed + i)
        final = None
        async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            final = out
        return len(final.outputs[0].token_ids)

    async def run() -> tuple[float, float]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        try:
            await asyncio.gather(*(one(engine, p, i) for i, p in enumerate(prompts)))  # warm-up
            seconds, rates = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                tokens = await asyncio.gather(*(one(engine, p, i) for i, p in enumerate(prompts)))
                elapsed = time.perf_counter() - start
                seconds.append(elapsed)
                rates.append(sum(tokens) / elapsed)
            return statistics.median(seconds), statistics.median(rates)
        finally:
            engine.shutdown()

    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["tiny-text", "tiny-vl", "qwen3-vl-2b"], default="tiny-text")
    parser.add_argument("--image", action="store_true", help="one MiniWoB screenshot per request (VL shapes)")
    parser.add_argument("--image-compare", action="store_true",
                        help="per batch size, on the same engine: no image, the same screenshot in every "
                             "request, a distinct screenshot per request; prints image / no-image ratios")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None)
    parser.add_argument("--enforce-eager", choices=["auto", "true", "false"], default="auto",
                        help="vLLM without CUDA graphs; auto = graphs on GPU (as the GPU presets), eager on CPU")
    parser.add_argument("--async-batch", type=int, default=0,
                        help="also time vLLM's AsyncLLM with this many concurrent requests (vs LLM batch)")
    return parser


def image_compare(engine, backend: str, bs: int, sampling, repeats: int) -> tuple[float, float]:
    """Batch size `bs` on one engine with no image, the same screenshot in every request and a
    distinct one per request (and, on vLLM, the old renderer); prints the ratios. Returns the
    distinct-screenshot (seconds per call, tokens/s)."""
    rates = {}
    kinds = [False, "same", "distinct"] + (["distinct+pixels"] if backend == "vllm" else [])
    for kind in kinds:
        # distinct+pixels: the old renderer, which ran the image processor before vLLM did.
        engine.render_pixels = kind == "distinct+pixels"
        requests = make_requests(bs, "distinct" if kind == "distinct+pixels" else kind)
        sec, rates[kind] = time_generate(engine, requests, sampling, repeats)
        print(f"[{backend}] batch {bs:>3} {kind or 'no image'}: {sec:.3f}s/call, {rates[kind]:,.0f} tokens/s",
              flush=True)
    engine.render_pixels = False
    print(f"[{backend}] batch {bs:>3} image / no image: same {rates['same'] / rates[False]:.2f}, "
          f"distinct {rates['distinct'] / rates[False]:.2f}"
          + (f"; distinct / old renderer {rates['distinct'] / rates['distinct+pixels']:.2f}x"
             if "distinct+pixels" in rates else ""), flush=True)
    return sec, rates["distinct"]


def bench_backend(backend: str, args: argparse.Namespace, model_path: pathlib.Path, batch_sizes: list[int],
                  sampling) -> tuple[dict[int, tuple[float, float]], tuple[float, float]]:
    """One engine of `backend`: (seconds per call, tokens/s) per batch size, then one full weight
    update (seconds, MB). The engine is closed before the next backend starts."""
    import torch

    from actors.engines import EngineConfig, create_engine

    start = time.perf_counter()
    eager = {"true": True, "false": False}.get(args.enforce_eager, not torch.cuda.is_available())
    engine = create_engine(EngineConfig(model=str(model_path), backend=backend, dtype=args.dtype,
                                        max_model_len=args.max_model_len, max_num_seqs=max(batch_sizes),
                                        enforce_eager=eager))
    print(f"[{backend}] engine start {time.perf_counter() - start:.1f}s", flush=True)
    results: dict[int, tuple[float, float]] = {}
    for bs in batch_sizes:
        if args.image_compare:
            results[bs] = image_compare(engine, backend, bs, sampling, args.repeats)
            continue
        results[bs] = time_generate(engine, make_requests(bs, args.image), sampling, args.repeats)
        sec, tps = results[bs]
        print(f"[{backend}] batch {bs:>3}: {sec:.3f}s/call, {tps:,.0f} tokens/s", flush=True)
    update = time_update(engine, model_path)
    print(f"[{backend}] weight update: {update[0]:.3f}s for {update[1]:.1f} MB", flush=True)
    engine.close()
    del engine
    return results, update


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.image or args.image_compare) and args.shape == "tiny-text":
        parser.error("--image needs a vision-language shape (tiny-vl or qwen3-vl-2b)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch

    from actors.engine import SamplingSettings

    model_path = model_for(args.shape, args.cache_dir)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # Temperature 1 with a fixed seed: both engines sample (greedy would favour neither).
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"model: {args.shape} ({model_path.name}), image: {args.image}, device: {device}, "
          f"max_new_tokens: {args.max_new_tokens}, repeats: {args.repeats}, vLLM CUDA graphs: "
          f"{args.enforce_eager == 'false' or (args.enforce_eager == 'auto' and torch.cuda.is_available())}")

    results: dict[str, dict[int, tuple[float, float]]] = {}
    updates: dict[str, tuple[float, float]] = {}
    for backend in args.backends.split(","):
        results[backend], updates[backend] = bench_backend(backend, args, model_path, batch_sizes, sampling)

    if {"vllm", "transformers"} <= results.keys():
        print("\nbatch | transformers tok/s | vLLM tok/s | vLLM / transformers")
        for bs in batch_sizes:
            hf, vl = results["transformers"][bs][1], results["vllm"][bs][1]
            print(f"{bs:>5} | {hf:>18,.0f} | {vl:>10,.0f} | {vl / hf:>6.2f}x")
    for backend, (sec, mb) in updates.items():
        print(f"weight update ({backend}): {sec:.3f}s, {mb:.1f} MB")
    if args.async_batch:
        requests = make_requests(args.async_batch, args.image)
        if "vllm" not in results or args.async_batch not in results["vllm"]:
            parser.error("--async-batch must be one of --batch-sizes with the vllm backend")
        sec, tps = time_async_llm(model_path, requests, sampling, args.repeats, args)
        llm_tps = results["vllm"][args.async_batch][1]
        print(f"\nAsyncLLM, {args.async_batch} concurrent requests: {sec:.3f}s, {tps:,.0f} tokens/s; "
              f"LLM batch: {llm_tps:,.0f} tokens/s; AsyncLLM / LLM = {tps / llm_tps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
