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
    from actors.trajectory import Step, Trajectory, TrajectoryGroup

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-vl-2b", help="qwen3-vl-2b or tiny-vl")
    p.add_argument("--model-dir", default="/tmp/bgrpo-shaped-model")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--sync-repeats", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import ray
    import torch

    from actors.engine import SamplingSettings
    from actors.engines.config import EngineConfig
    from actors.engines.host import EngineHostActor
    from actors.tiny_models import build_qwen3_vl_2b_shape, build_tiny_vl_model
    from learner.config import GRPOConfig, LearnerConfig
    from learner.learner import LearnerActor

    assert torch.cuda.device_count() >= 2, "needs 2 GPUs"
    gpu_name = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    if args.shape == "tiny-vl":
        model_dir = str(build_tiny_vl_model())
    else:
        model_dir = str(build_qwen3_vl_2b_shape(args.model_dir))
    build_s = time.perf_counter() - t0

    ray.init(address="local", num_gpus=2, include_dashboard=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in (
                 "PYTHONPATH", "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_USE_FLASHINFER_SAMPLER",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NCCL_NVLS_ENABLE",
                 "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS") if k in os.environ}})
    result: dict = {"gpu": gpu_name, "shape": args.shape, "model_build_s": round(build_s, 1)}
    try:
        lcfg = LearnerConfig(model_path=model_dir, device="cuda", dtype="bfloat16", lr=1e-6,
                             gradient_checkpointing=True, micro_batch_size=8, total_steps=1000,
                             warmup_steps=0, publish_dtype="bfloat16",
                             grpo=GRPOConfig(num_generations=args.group_size, temperature=0.5,
                                             max_completion_length=args.max_new_tokens))
        learner = LearnerActor.options(num_gpus=1).remote(lcfg)
        engine = EngineHostActor.options(num_gpus=1).remote(
            EngineConfig(model=model_dir, backend="vllm", dtype="bfloat16", max_model_len=4096,
                         gpu_memory_utilization=0.6, enforce_eager=False, max_num_seqs=128))
        t0 = time.perf_counter()
        info = ray.get(learner.prepare_weight_broadcast.remote(bucket_mb=args.bucket_mb))
        ray.get([learner.connect_weight_broadcast.remote(world_size=2),
                 engine.connect_weight_sync.remote(info["host"], info["port"], 1, 2, info["layout"])])
        result["nccl_group_setup_s"] = round(time.perf_counter() - t0, 2)
        result["sync_bytes"] = info["bytes"]

        sampling = SamplingSettings(temperature=0.5, top_k=10, max_new_tokens=args.max_new_tokens)
        n = args.groups * args.group_size
        requests = build_requests(n)
        ray.get(engine.generate.remote(requests, sampling))  # warm-up at this batch size
        steps = []
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            gens = ray.get(engine.generate.remote(requests, sampling))
            t1 = time.perf_counter()
            assert {g.policy_version for g in gens} == {step - 1}, "engine sampled with a stale version"
            metrics = ray.get(learner.train_step.remote(to_groups(gens, args.groups, args.group_size, step)))
            t2 = time.perf_counter()
            sent, got = ray.get([learner.broadcast_weights.remote(),
                                 engine.update_weights_nccl.remote(step)])
            t3 = time.perf_counter()
            lv, ev = ray.get([learner.get_policy_version.remote(), engine.policy_version.remote()])
            assert lv == ev == step, f"versions diverged: learner {lv}, engine {ev}"
            steps.append({"step": step, "generate_s": round(t1 - t0, 3), "train_s": round(t2 - t1, 3),
                          "nccl_sync_s": round(t3 - t2, 4), "sender_pack_s": round(sent["pack_s"], 4),
                          "sender_send_s": round(sent["send_s"], 4),
                          "engine_receive_load_s": round(got["receive_load_s"], 4),
                          "learner_version": lv, "engine_version": ev,
                          "tokens": metrics.get("tokens"), "loss": metrics.get("loss"),
                          "completion_tokens": sum(len(g.completion_ids) for g in gens)})
            print(json.dumps(steps[-1]), flush=True)
        result["steps"] = steps

        # --- weight sync: NCCL (the steps above) vs the object store (the same loop, more steps) ---
        store = []
        for step in range(args.steps + 1, args.steps + 1 + args.sync_repeats):
            gens = ray.get(engine.generate.remote(requests, sampling))
            ray.get(learner.train_step.remote(to_groups(gens, args.groups, args.group_size, step)))
            t0 = time.perf_counter()
            handle = ray.get(learner.publish_weights.remote())
            t1 = time.perf_counter()
            detail = ray.get(engine.update_weights_from_handle.remote(handle))
            store.append((time.perf_counter() - t0, t1 - t0, detail["fetch_s"], detail["load_s"]))
            assert detail["version"] == handle.version == step
        link = ray.get([learner.broadcast_probe.remote(), engine.broadcast_probe.remote()])[0]
        nccl = [s["nccl_sync_s"] for s in steps]
        gb = info["bytes"] / 1e9
        nccl_med = statistics.median(nccl)
        store_med = statistics.median(s[0] for s in store)
        result["sync"] = {
            "bytes": info["bytes"],
            "nccl_end_to_end_s": nccl,
            "nccl_median_s": round(nccl_med, 4),
            "nccl_GBps": round(gb / nccl_med, 1),
            "object_store_end_to_end_s": [round(s[0], 3) for s in store],
            "object_store_publish_s": [round(s[1], 3) for s in store],
            "object_store_fetch_s": [round(s[2], 3) for s in store],
            "object_store_load_s": [round(s[3], 3) for s in store],
            "object_store_median_s": round(store_med, 3),
            "object_store_over_nccl": round(store_med / nccl_med, 1),
            "raw_link_GBps": round(link["GBps"], 1),
            "raw_broadcast_s": round(link["seconds"], 4),
        }
        print(json.dumps(result["sync"]), flush=True)
    finally:
        ray.shutdown()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
