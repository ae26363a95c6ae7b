"""Env benchmark: step latency over the WebSocket vs the same env in-process, and observation
bytes per step with and without the screenshot. Everything is measured in this one run, on this
machine, and printed as ratios against the in-process baseline.

    python bench/bench_env.py [--steps 20] [--task miniwob.enter-text]

Steps are `fill(<textbox>, ...)` on enter-text: they change the page but never end the episode, so
every sample is a plain step (no reset). At most two browsers run at once (one env at a time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _textbox_bid(observation) -> str:
    return next(e["bid"] for e in observation.clickable_elements if e["role"] in ("textbox", "input"))


def _time_steps(step, first_observation, steps: int, warmup: int = 2) -> list[float]:
    bid = _textbox_bid(first_observation)
    samples = []
    for i in range(warmup + steps):
        action = f"fill('{bid}', 'word {i}')"
        started = time.perf_counter()
        step(action)
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    return samples


def _summary(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:7.1f} ms   mean {statistics.mean(samples) * 1000:7.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--task", default="miniwob.enter-text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from openenv.core.env_server.serialization import serialize_observation

    from envs.browsergym.client import BrowserGymEnvClient
    from envs.browsergym.config import EnvConfig
    from envs.browsergym.models import BrowserGymAction
    from envs.browsergym.pool import EnvServerPool
    from envs.browsergym.server.environment import BrowserGymEnvironment

    max_steps = args.steps + 10
    results: dict[str, list[float]] = {}

    # --- baseline: the env in this process, no serialization, no socket ---
    config = EnvConfig(task=args.task, max_steps=max_steps)
    env = BrowserGymEnvironment(config)
    try:
        first = env.reset(seed=args.seed)
        results["in-process"] = _time_steps(lambda a: env.step(BrowserGymAction(action_str=a)), first, args.steps)
        # --- observation bytes: the JSON the server sends for one step ---
        observation = env.step(BrowserGymAction(action_str=f"fill('{_textbox_bid(first)}', 'bytes')"))
        with_png = len(json.dumps(serialize_observation(observation)).encode())
        without = len(json.dumps(serialize_observation(observation.model_copy(update={"screenshot_png_b64": ""}))).encode())
        png_bytes = len(observation.screenshot_png_b64) * 3 // 4
        # upstream OpenEnv's format: the screenshot as nested integer lists
        raw = env._gym_env._get_obs()["screenshot"]
        started = time.perf_counter()
        nested = observation.model_copy(update={"screenshot_png_b64": "", "screenshot": raw.tolist()})
        with_nested = len(json.dumps(serialize_observation(nested)).encode())
        nested_seconds = time.perf_counter() - started
    finally:
        env.close()

    # --- the same env behind a server, over the WebSocket (screenshot on, then off) ---
    for label, include_screenshot in (("websocket", True), ("websocket, no screenshot", False)):
        server_config = EnvConfig(task=args.task, max_steps=max_steps, include_screenshot=include_screenshot, max_sessions=1)
        with EnvServerPool(1, server_config) as pool:
            with BrowserGymEnvClient(pool.urls[0], message_timeout_s=120) as client:
                first = client.reset(seed=args.seed).observation
                results[label] = _time_steps(client.step, first, args.steps)

    base = statistics.median(results["in-process"])
    print(f"BrowserGym env benchmark: {args.task}, {args.steps} steps per setting (after 2 warm-up steps), one run")
    print("step latency")
    for label, samples in results.items():
        print(f"  {label:26s} {_summary(samples)}   ratio vs in-process {statistics.median(samples) / base:5.2f}x")
    print(
        f"  websocket overhead per step (median): {(statistics.median(results['websocket']) - base) * 1000:.1f} ms"
    )
    print("observation bytes per step (JSON message)")
    print(f"  without screenshot          {without:9d} B")
    print(f"  with PNG screenshot (ours)  {with_png:9d} B   ratio {with_png / without:6.2f}x   (PNG itself {png_bytes} B)")
    print(
        f"  with nested-list screenshot {with_nested:9d} B   ratio {with_nested / without:6.2f}x   "
        f"(upstream format; {with_nested / with_png:.1f}x ours, {nested_seconds * 1000:.0f} ms to build + encode)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
