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


def _time_interleaved(steppers: dict, first_observations: dict, steps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Alternate one step of each setting per round, so that load from other processes on a busy
    machine hits every setting alike; returns per-setting step times in seconds."""
    bids = {label: _textbox_bid(obs) for label, obs in first_observations.items()}
    samples: dict[str, list[float]] = {label: [] for label in steppers}
    for i in range(warmup + steps):
        for label, step in steppers.items():
            action = f"fill('{bids[label]}', 'word {i}')"
            started = time.perf_counter()
            step(action)
            if i >= warmup:
                samples[label].append(time.perf_counter() - started)
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

    max_steps = 2 * args.steps + 20
    config = EnvConfig(task=args.task, max_steps=max_steps)
    env = BrowserGymEnvironment(config)  # the baseline: same env in this process, no socket
    phases = []  # (websocket label, samples per setting) measured side by side
    try:
        first = env.reset(seed=args.seed)

        def in_process(action: str):
            return env.step(BrowserGymAction(action_str=action))

        # --- observation bytes: the JSON the server sends for one step ---
        observation = in_process(f"fill('{_textbox_bid(first)}', 'bytes')")
        with_png = len(json.dumps(serialize_observation(observation)).encode())
        without = len(json.dumps(serialize_observation(observation.model_copy(update={"screenshot_png_b64": ""}))).encode())
        png_bytes = len(observation.screenshot_png_b64) * 3 // 4
        # upstream OpenEnv's format: the screenshot as nested integer lists
        raw = env._gym_env._get_obs()["screenshot"]
        started = time.perf_counter()
        nested = observation.model_copy(update={"screenshot_png_b64": "", "screenshot": raw.tolist()})
        with_nested = len(json.dumps(serialize_observation(nested)).encode())
        nested_seconds = time.perf_counter() - started

        # --- the same env behind a server, over the WebSocket, interleaved with the baseline ---
        for label, include_screenshot in (("websocket", True), ("websocket, no screenshot", False)):
            server_config = EnvConfig(
                task=args.task, max_steps=max_steps, include_screenshot=include_screenshot, max_sessions=1
            )
            with EnvServerPool(1, server_config) as pool:
                with BrowserGymEnvClient(pool.urls[0], message_timeout_s=120) as client:
                    remote_first = client.reset(seed=args.seed).observation
                    local_first = env.reset(seed=args.seed)
                    samples = _time_interleaved(
                        {"in-process": in_process, label: client.step},
                        {"in-process": local_first, label: remote_first},
                        args.steps,
                    )
            phases.append((label, samples))
    finally:
        env.close()
        from envs.browsergym.chromium import stop_global_playwright

        stop_global_playwright()  # this process's Playwright driver

    print(f"BrowserGym env benchmark: {args.task}, {args.steps} steps per setting (after 2 warm-up steps), one run;")
    print("each WebSocket setting is timed alternating step by step with the in-process env (same load)")
    print("step latency")
    for label, samples in phases:
        base = statistics.median(samples["in-process"])
        remote = statistics.median(samples[label])
        print(f"  in-process                 {_summary(samples['in-process'])}")
        print(f"  {label:26s} {_summary(samples[label])}   ratio vs in-process {remote / base:5.2f}x   ({(remote - base) * 1000:+.1f} ms)")
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
