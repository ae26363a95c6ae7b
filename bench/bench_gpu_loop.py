"""The GPU path end to end, on 2 GPUs: learner on one, a vLLM rollout engine on the other.

    python bench/bench_gpu_loop.py --shape qwen3-vl-2b --steps 5 [--out result.json]

What it runs (real Ray actors, real vLLM on CUDA, the real GRPO learner in bf16):
  1. a random-initialised model of the requested shape (no download), saved once to disk;
  2. `LearnerActor` (1 GPU) and `EngineHostActor` with the vLLM backend (1 GPU), placed by Ray;
  3. the NCCL weight-sync group: learner rank 0 + the engine's worker, rendezvous through Ray;
  4. `--steps` sync-mode steps: the engine samples GRPO groups of single-step episodes on a
     recorded MiniWoB observation (the committed click-button screenshot and its goal: the GPU
     machine has no browser), the learner trains on exactly those tokens, the new weights go
     over NCCL and the engine reports the new version, asserted equal to the learner's;
  5. weight-sync time, NCCL vs the Ray object store, in the same run, with bytes moved and GB/s
     next to the link bandwidth measured by a raw broadcast of the same buffers.

Prints one JSON object (also written to --out); the README quotes it with the card's name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL = 'Click on the "submit" button.'
CLICKABLE = [
    {"bid": "13", "role": "button", "text": "submit", "bbox": [12, 60, 60, 22]},
    {"bid": "14", "role": "button", "text": "cancel", "bbox": [80, 60, 60, 22]},
    {"bid": "15", "role": "button", "text": "ok", "bbox": [150, 60, 40, 22]},
]


def recorded_observation() -> dict:
    png = (REPO / "tests" / "data" / "miniwob_click_button.png").read_bytes()
    return {"goal": GOAL, "url": "file:///miniwob/click-button.html", "clickable_elements": CLICKABLE,
            "screenshot_png": png}


def build_requests(n: int):
    from actors.config import PromptConfig
    from actors.engine import ChatRequest
    from actors.prompts import system_prompt, user_prompt

    obs = recorded_observation()
    cfg = PromptConfig()
    text = user_prompt(obs, 0, [], cfg)
    messages = [
        {"role": "system", "content": system_prompt(["click", "fill", "noop"])},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
    ]
    return [ChatRequest(messages=messages, images=[obs["screenshot_png"]]) for _ in range(n)]


def reward_of(completion_ids: list[int]) -> float:
    # A random model never solves the task; a dense, deterministic stand-in reward (fraction of
    # distinct tokens) still gives every group non-zero variance, so every step trains for real.
    return len(set(completion_ids)) / max(1, len(completion_ids))


def to_groups(generations, num_groups: int, group_size: int, step: int):
    from core.trajectory import Step, Trajectory, TrajectoryGroup

    png = recorded_observation()["screenshot_png"]
    groups = []
    for g in range(num_groups):
        gid = f"s{step}g{g}"
        trajs = []
        for i in range(group_size):
            gen = generations[g * group_size + i]
            r = reward_of(gen.completion_ids)
            st = Step(index=0, prompt_ids=gen.prompt_ids, completion_ids=gen.completion_ids,
                      logprobs=gen.logprobs, policy_version=gen.policy_version, images=[png],
                      completion_text=gen.text, action=gen.text, reward=r, done=True,
                      finish_reason=gen.finish_reason)
            trajs.append(Trajectory(episode_id=f"{gid}e{i}", group_id=gid, task="recorded.click-button",
                                    seed=g, steps=[st], episode_return=r))
        groups.append(TrajectoryGroup(gid, "recorded.click-button", g, trajs))
    return groups


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-vl-2b", help="qwen3-vl-2b or tiny-vl")
    p.add_argument("--model-dir", default=None, help="cache folder of the shaped model")
    p.add_argument("--learner-ranks", type=int, default=1)
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--transport", choices=["nccl", "object_store"], default="nccl",
                   help="transport of the timed loop; the other one is timed after it (nccl only)")
    p.add_argument("--gpu-fraction", type=float, default=1.0,
                   help="GPUs per actor (0.5: learner and engine share one GPU, object_store only)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--sync-repeats", type=int, default=4)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def init_ray(num_gpus: int) -> None:
    """A local Ray whose workers inherit the variables that shape vLLM, NCCL and offline mode."""
    import ray

    ray.init(address="local", num_gpus=num_gpus, include_dashboard=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in (
                 "PYTHONPATH", "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_USE_FLASHINFER_SAMPLER",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NCCL_NVLS_ENABLE",
                 "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS") if k in os.environ}})


class GpuLoop:
    """R learner ranks and M vLLM engines (Ray sets CUDA_VISIBLE_DEVICES per actor), the
    weight-sync transports between them, and one timed sync-mode step."""

    def __init__(self, args: argparse.Namespace, model_dir: str, result: dict) -> None:
        import ray

        from actors.engine import SamplingSettings
        from actors.engines.config import EngineConfig
        from actors.engines.host import EngineHostActor
        from learner.config import GRPOConfig, LearnerConfig
        from learner.learner import LearnerActor
        from weightsync import make_weight_sync

        self.args, self.result = args, result
        R, M, frac = args.learner_ranks, args.engines, args.gpu_fraction
        lcfg = LearnerConfig(model_path=model_dir, device="cuda", dtype="bfloat16", lr=1e-6,
                             gradient_checkpointing=True, micro_batch_size=8, total_steps=1000,
                             warmup_steps=0, publish_dtype="bfloat16", num_ranks=R,
                             grpo=GRPOConfig(num_generations=args.group_size, temperature=0.5,
                                             max_completion_length=args.max_new_tokens))
        self.learners = [LearnerActor.options(num_gpus=frac).remote(lcfg, rank=r, world_size=R) for r in range(R)]
        self.engines = [EngineHostActor.options(num_gpus=frac).remote(
            EngineConfig(model=model_dir, backend="vllm", dtype="bfloat16", max_model_len=2048,
                         gpu_memory_utilization=args.gpu_memory_utilization * (frac if frac < 1 else 1),
                         enforce_eager=True, max_num_seqs=128)) for _ in range(M)]
        if R > 1:
            addr, port = ray.get(self.learners[0].rendezvous_address.remote())
            ray.get([lr.connect.remote(addr, port) for lr in self.learners])
        self.rank0 = self.learners[0]
        self.store_sync = make_weight_sync("object_store", self.rank0, self.engines, timeout_s=60.0)
        self.nccl_sync = None
        self.sampling = SamplingSettings(temperature=0.5, top_k=10, max_new_tokens=args.max_new_tokens)
        self.requests = build_requests(args.groups * args.group_size)

    def connect_nccl(self) -> None:
        """The NCCL weight-sync group: learner rank 0 + every engine's worker."""
        from weightsync import make_weight_sync

        self.nccl_sync = make_weight_sync("nccl", self.rank0, self.engines, timeout_s=60.0,
                                          bucket_mb=self.args.bucket_mb)
        self.nccl_sync.setup()
        self.result["sync_bytes"] = self.nccl_sync.info["bytes"]

    def sync_nccl(self, version: int) -> tuple[float, dict]:
        import ray

        t = time.perf_counter()
        pending = self.nccl_sync.send()
        sent = ray.get(pending.sender_ref)
        assert self.nccl_sync.wait(pending) == version
        return time.perf_counter() - t, sent.stats

    def sync_store(self, version: int) -> tuple[float, dict]:
        import ray

        t = time.perf_counter()
        pending = self.store_sync.send()
        t_pub = time.perf_counter() - t
        assert self.store_sync.wait(pending) == version
        elapsed = time.perf_counter() - t
        details = ray.get([e.weight_sync_stats.remote("object_store") for e in self.engines])
        self.result["sync_bytes"] = pending.update.num_bytes
        return elapsed, {"publish_s": t_pub, "fetch_s": max(d["fetch_s"] for d in details),
                         "load_s": max(d["load_s"] for d in details)}

    def warm_up(self) -> None:
        """One generation at the loop's batch size, so the first timed step compiles nothing."""
        import ray

        ray.get([e.generate.remote(self.requests, self.sampling) for e in self.engines])

    def one_step(self, step: int, sync) -> dict:
        """Sample (each engine its share of the groups), train, sync with `sync`; every version
        is checked and the row printed."""
        import ray

        args, engines, learners, requests = self.args, self.engines, self.learners, self.requests
        M = len(engines)
        t0 = time.perf_counter()
        per = [requests[i::M] for i in range(M)]
        outs = ray.get([e.generate.remote(rq, self.sampling) for e, rq in zip(engines, per)])
        gens = [None] * len(requests)
        for i, out in enumerate(outs):
            gens[i::M] = out
        t1 = time.perf_counter()
        assert {g.policy_version for g in gens} == {step - 1}, "an engine sampled with a stale version"
        groups = to_groups(gens, args.groups, args.group_size, step)
        metrics = ray.get([lr.train_step.remote(groups) for lr in learners])[0]
        t2 = time.perf_counter()
        sync_s, detail = sync(step)
        versions = ray.get([lr.get_policy_version.remote() for lr in learners]
                           + [e.policy_version.remote() for e in engines])
        assert set(versions) == {step}, f"versions diverged: {versions}"
        row = {"step": step, "generate_s": round(t1 - t0, 3), "train_s": round(t2 - t1, 3),
               "sync_s": round(sync_s, 4), "versions": versions,
               "train_tokens": metrics.get("tokens"), "train_tokens_per_s": round(metrics.get("tokens", 0) / (t2 - t1), 1),
               "loss": metrics.get("loss"),
               "detail": {k: round(v, 4) for k, v in detail.items() if isinstance(v, float)}}
        if len(learners) > 1:
            digests = ray.get([lr.parameters_digest.remote() for lr in learners])
            row["ranks_identical"] = all(d == digests[0] for d in digests)
            assert row["ranks_identical"], "learner ranks diverged"
        print(json.dumps(row), flush=True)
        return row


def timed_loop(loop: GpuLoop, args: argparse.Namespace, result: dict) -> None:
    """`--steps` steps over the chosen transport; medians of sync time and training throughput."""
    main_sync = loop.sync_nccl if args.transport == "nccl" else loop.sync_store
    steps = [loop.one_step(step, main_sync) for step in range(1, args.steps + 1)]
    result["steps"] = steps
    sync_times = [r["sync_s"] for r in steps]
    result["sync_median_s"] = round(statistics.median(sync_times), 4)
    result["train_tokens_per_s_median"] = round(statistics.median(r["train_tokens_per_s"] for r in steps), 1)
    result["sync_GBps"] = round(result["sync_bytes"] / 1e9 / result["sync_median_s"], 2)


def object_store_comparison(loop: GpuLoop, args: argparse.Namespace, result: dict) -> None:
    """The object store in the same run as NCCL: the same loop, more steps; and the raw link."""
    start = args.steps + 1
    store = [loop.one_step(step, loop.sync_store) for step in range(start, start + args.sync_repeats)]
    store_med = statistics.median(r["sync_s"] for r in store)
    link = loop.nccl_sync.probe()
    # The first object-store sync also pays one-time costs (pinned staging on the learner,
    # the engine's staging file): the steady state is the median of the later ones.
    steady = statistics.median(r["sync_s"] for r in store[1:]) if len(store) > 1 else store_med
    result["object_store"] = {"sync_s": [r["sync_s"] for r in store], "median_s": round(store_med, 3),
                              "steady_median_s": round(steady, 3),
                              "detail": [r["detail"] for r in store],
                              "over_nccl": round(store_med / result["sync_median_s"], 1)}
    result["raw_link"] = {"GBps": round(link["GBps"], 1), "seconds": round(link["seconds"], 4)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import ray
    import torch

    from actors.tiny_models import build_qwen3_vl_2b_shape, build_tiny_vl_model

    R, M, frac = args.learner_ranks, args.engines, args.gpu_fraction
    need = (R + M) * frac
    assert torch.cuda.device_count() >= need, f"needs {need} GPUs"
    gpu_name = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    model_dir = str(build_tiny_vl_model() if args.shape == "tiny-vl" else build_qwen3_vl_2b_shape(args.model_dir))
    build_s = time.perf_counter() - t0

    init_ray(torch.cuda.device_count())
    result: dict = {"gpu": gpu_name, "shape": args.shape, "learner_ranks": R, "engines": M,
                    "transport": args.transport, "model_build_s": round(build_s, 1)}
    try:
        loop = GpuLoop(args, model_dir, result)
        t0 = time.perf_counter()
        if args.transport == "nccl":
            loop.connect_nccl()
        result["setup_s"] = round(time.perf_counter() - t0, 2)
        loop.warm_up()
        timed_loop(loop, args, result)
        if args.transport == "nccl":
            object_store_comparison(loop, args, result)
    finally:
        ray.shutdown()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
