"""Learner throughput: samples/s and tokens/s of `Learner.train_step`, with and without gradient
checkpointing, measured in the same run (the ratio is the result; absolute numbers depend on
the machine).

    # CPU, the tiny text and tiny VL models (default)
    .venv/bin/python bench/bench_learner.py
    # one GPU, a random-initialised model of Qwen3-VL-2B-Instruct's exact shape (no download):
    # tokens/s and model FLOPs utilisation, with and without gradient checkpointing
    .venv/bin/python bench/bench_learner.py --shape qwen3-vl-2b --device cuda

Each training sample is one agent step: a prompt (with one screenshot for VL models, its image
tokens expanded as the engine would) and a completion, random token ids. MFU counts
6 * N * tokens (N: text-model parameters, tied embedding once, times every prompt+completion
token; plus the vision tower's parameters times its patches) over the GPU's dense bf16 peak;
attention's sequence-length term is left out, so MFU is slightly underestimated.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Qwen/Qwen3-VL-2B-Instruct's real special-token ids (the architecture is actors.tiny_models').
QWEN3_VL_2B_SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_end|>": 151645, "<|image_pad|>": 151655,
    "<|video_pad|>": 151656, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
}

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = [
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM / HBM3
    ("A100", 312.0e12),
    ("L40S", 362.1e12),
    ("A10G", 70.0e12),
    ("L4", 121.0e12),
    ("RTX 4090", 165.2e12),
]


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_groups(args, vocab: int, vision, special: set[int]):
    """Synthetic GRPO groups of one-step episodes with exact (random) token ids."""
    from core.trajectory import Step, Trajectory, TrajectoryGroup

    rng = random.Random(0)
    image_tokens, image = 0, None
    if vision is not None:
        # A different screenshot per sample: the learner's per-batch image cache (same first
        # screenshot across a group's episodes) then saves nothing here, a conservative choice.
        image = _png(args.image_width, args.image_height, seed=1)
        from learner.batching import _decode_png

        out = vision.image_processor(images=[_decode_png(image)], return_tensors="pt")
        image_tokens = int(out["image_grid_thw"].prod() // vision.merge_size**2)
    groups = []
    G = args.group_size
    for g in range(max(1, args.batch // G)):
        trajs = []
        for i in range(G):
            def tok():
                while True:
                    t = rng.randrange(vocab)
                    if t not in special:
                        return t
            text_len = max(1, args.prompt_len - image_tokens)
            prompt = [tok() for _ in range(text_len)]
            if vision is not None:
                cut = text_len // 2
                prompt = prompt[:cut] + [vision.image_token_id] * image_tokens + prompt[cut:]
            completion = [tok() for _ in range(args.completion_len)]
            step = Step(index=0, prompt_ids=prompt, completion_ids=completion,
                        logprobs=[-1.0] * len(completion), policy_version=0,
                        images=[_png(args.image_width, args.image_height, seed=1000 * g + i)]
                        if image is not None else [])
            trajs.append(Trajectory(episode_id=f"{g}-{i}", group_id=str(g), task="bench", seed=g,
                                    steps=[step], episode_return=float(i % 2)))
        groups.append(TrajectoryGroup(str(g), "bench", g, trajs))
    return groups, image_tokens


def qwen3_vl_2b_folder() -> Path:
    """A folder with Qwen3-VL-2B's config.json (no weights) plus the tiny VL model's tokenizer and
    an image processor with Qwen3-VL's patching: enough for the Learner's tokenizer/processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from actors.tiny_models import build_tiny_vl_model

    tiny = build_tiny_vl_model()
    folder = Path(tempfile.mkdtemp(prefix="qwen3-vl-2b-shape-"))
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(f, folder / f.name)
    Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2,
        min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 1024,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)
    from actors.tiny_models import qwen3_vl_2b_config

    qwen3_vl_2b_config(QWEN3_VL_2B_SPECIAL_IDS).save_pretrained(folder)
    return folder


def build_model(shape: str, model_path: Path, device: torch.device):
    """The model to train: the tiny folders load normally; qwen3-vl-2b is built from its config
    with random weights directly on the device."""
    if shape != "qwen3-vl-2b":
        return None
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_path)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(
            config, dtype=torch.float32, attn_implementation="sdpa"
        )
    return model


def param_counts(model) -> tuple[int, int]:
    """(text-model parameters, vision-tower parameters); tied weights once (named_parameters
    yields a shared parameter once)."""
    text = vision = 0
    for name, p in model.named_parameters():
        if "visual." in name:
            vision += p.numel()
        else:
            text += p.numel()
    return text, vision


class Case:
    """One learner on one batch; `step()` times one train_step."""

    def __init__(self, args, shape: str, model_path: Path, gc: bool, compiled: bool = False,
                 packed: bool = True) -> None:
        from learner.config import GRPOConfig, LearnerConfig
        from learner.learner import Learner

        self.args, self.shape, self.gc, self.compiled, self.packed = args, shape, gc, compiled, packed
        self.device = torch.device(args.device)
        cfg = LearnerConfig(
            model_path=str(model_path), lr=1e-6, micro_batch_size=args.micro_batch_size,
            device=args.device, dtype=args.dtype if args.device == "cuda" else "float32",
            gradient_checkpointing=gc, compile=compiled, packed_vision_attention=packed, seed=0,
            grpo=GRPOConfig(max_completion_length=args.completion_len),
        )
        self.learner = Learner(cfg, model=build_model(shape, model_path, self.device))
        model = self.learner.model
        vocab = model.get_input_embeddings().weight.shape[0]
        special = {self.learner.pad_token_id}
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            v = getattr(model.config, k, None)
            if v is not None:
                special.add(int(v))
        self.groups, self.image_tokens = make_groups(args, vocab, self.learner.vision, special)
        self.n_text, self.n_vision = param_counts(model)
        self.elapsed = 0.0
        self.tokens = self.samples = 0.0
        self.phases = {"time/collate_wait_s": 0.0, "time/forward_backward_s": 0.0, "time/optimizer_s": 0.0}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, timed: bool) -> None:
        self._sync()
        t0 = time.perf_counter()
        m = self.learner.train_step(self.groups)
        self._sync()
        if timed:
            self.elapsed += time.perf_counter() - t0
            self.tokens += m["tokens"] + m["prompt_tokens"]
            self.samples += m["samples"]
            for k in self.phases:
                self.phases[k] += m[k]

    def result(self) -> dict:
        patches = self.image_tokens * 4 * self.samples  # 2x2 merge: 4 patches per image token
        flops = 6 * (self.n_text * self.tokens + self.n_vision * patches)
        r = {
            "shape": self.shape, "gc": self.gc, "compile": self.compiled,
            "packed_vision": self.learner.packed_vision_layers > 0, "samples_per_s": self.samples / self.elapsed,
            "tokens_per_s": self.tokens / self.elapsed, "step_s": self.elapsed / self.args.steps,
            "params_text": self.n_text, "params_vision": self.n_vision,
            "image_tokens": self.image_tokens, "achieved_tflops": flops / self.elapsed / 1e12,
            "phases": {k.split("/")[1][:-2]: v / self.elapsed for k, v in self.phases.items()},
        }
        if self.device.type == "cuda":
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            peak = peak_flops(torch.cuda.get_device_name())
            r["mfu"] = flops / self.elapsed / peak if peak else float("nan")
        return r

    def close(self) -> None:
        del self.learner
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def variants(args) -> list[tuple[bool, bool, bool]]:
    """(gradient checkpointing, compile, packed vision attention) of each case; the first is the
    baseline of the ratios."""
    gcs = {"both": [False, True], "off": [False], "on": [True]}[args.grad_ckpt]
    packs = {"both": [False, True], "off": [False], "on": [True]}[args.packed_vision]
    return [(gc, c, pv) for c in ([False, True] if args.compile else [False]) for gc in gcs for pv in packs]


def measure(args, shape: str, model_path: Path) -> list[dict]:
    """Every variant. On CPU all learners exist at once and their timed steps alternate, so load
    from other processes hits them alike; on a GPU (dedicated, and too small for several 2B
    learners) they run one after the other."""
    if args.device == "cpu":
        cases = [Case(args, shape, model_path, gc, c, pv) for gc, c, pv in variants(args)]
        for _ in range(args.warmup):
            for c in cases:
                c.step(timed=False)
        for _ in range(args.steps):
            for c in cases:
                c.step(timed=True)
        return [c.result() for c in cases]
    rows = []
    for gc, compiled, packed in variants(args):
        c = Case(args, shape, model_path, gc, compiled, packed)
        for _ in range(args.warmup):
            c.step(timed=False)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            c.step(timed=True)
        rows.append(c.result())
        print_row(rows[-1], rows[0])  # as soon as measured: a GPU run may be cut short
        if args.profile and not gc:
            profile_step(c)
        c.close()
    return rows


def print_row(r: dict, base: dict) -> None:
    line = (f"{r['shape']:12s} grad_ckpt={'on ' if r['gc'] else 'off'} compile={'on ' if r['compile'] else 'off'} "
            f"packed_vision={'on ' if r['packed_vision'] else 'off'}  "
            f"{r['samples_per_s']:8.2f} samples/s  {r['tokens_per_s']:10.0f} tokens/s  "
            f"{r['step_s']:7.3f} s/step  {r['achieved_tflops']:8.3f} TFLOP/s  "
            f"x{r['tokens_per_s'] / base['tokens_per_s']:.2f} vs first row")
    if "mfu" in r:
        line += f"  MFU {100 * r['mfu']:5.1f}%  peak mem {r['peak_mem_gib']:.1f} GiB"
    print(line)
    print(" " * 14 + "time shares: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["phases"].items()), flush=True)


def profile_step(case: Case) -> None:
    """One more step under torch.profiler: where the time goes (GPU kernels vs host)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        case.step(timed=False)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    print(f"profile ({'compiled' if case.compiled else 'eager'}, packed vision "
          f"{'on' if case.packed else 'off'}): step {wall:.3f} s, GPU kernels busy "
          f"{gpu_us / 1e6:.3f} s ({100 * gpu_us / 1e6 / wall:.0f}% of the step), {launches} kernel launches")
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["tiny", "tiny-text", "tiny-vl", "qwen3-vl-2b"], default="tiny",
                   help="tiny = tiny-text and tiny-vl")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="bfloat16", help="autocast dtype on cuda (cpu: float32)")
    p.add_argument("--batch", type=int, default=None, help="samples per train_step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens incl. image tokens")
    p.add_argument("--completion-len", type=int, default=None)
    p.add_argument("--image-width", type=int, default=498, help="MiniWoB screenshot size")
    p.add_argument("--image-height", type=int, default=321)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--compile", action="store_true", help="also measure learner.compile (torch.compile per layer)")
    p.add_argument("--grad-ckpt", choices=["both", "on", "off"], default="both", help="gradient checkpointing variants")
    p.add_argument("--packed-vision", choices=["both", "on", "off"], default="on",
                   help="learner.packed_vision_attention variants (VL models)")
    p.add_argument("--profile", action="store_true", help="cuda: profile one extra step of each variant without grad-ckpt")
    args = p.parse_args(argv)

    big = args.shape == "qwen3-vl-2b"
    if big and args.device == "cpu":
        print("note: qwen3-vl-2b on cpu is very slow; use --device cuda", file=sys.stderr)
    args.batch = args.batch or (32 if big else 16)
    args.micro_batch_size = args.micro_batch_size or (8 if big else 8)
    args.prompt_len = args.prompt_len or (1024 if big else 96)
    args.completion_len = args.completion_len or (64 if big else 16)
    args.steps = args.steps or (5 if big else 5)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no GPU is visible", file=sys.stderr)
        return 2

    from actors.tiny_models import build_tiny_text_model, build_tiny_vl_model

    shapes = {"tiny": ["tiny-text", "tiny-vl"]}.get(args.shape, [args.shape])
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {device_name}; batch {args.batch} samples, micro-batch {args.micro_batch_size}, "
          f"prompt {args.prompt_len} + completion {args.completion_len} tokens, {args.steps} timed steps")
    for shape in shapes:
        path = {"tiny-text": build_tiny_text_model, "tiny-vl": build_tiny_vl_model}.get(shape)
        model_path = path() if path else qwen3_vl_2b_folder()
        try:
            rows = measure(args, shape, Path(model_path))
        finally:
            if shape == "qwen3-vl-2b":
                shutil.rmtree(model_path, ignore_errors=True)
        if args.device == "cpu":
            for r in rows:
                print_row(r, rows[0])
        print(f"{shape:12s} params: text {rows[0]['params_text'] / 1e6:.1f}M, vision "
              f"{rows[0]['params_vision'] / 1e6:.1f}M; image tokens/sample {rows[0]['image_tokens']}")
        if args.out:
            Path(args.out).write_text(json.dumps({"device": device_name, "args": vars(args), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
