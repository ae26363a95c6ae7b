"""Env benchmark: step latency over the WebSocket vs the same env in-process, and observation
bytes per step with and without the screenshot. Everything is measured in this one run, on this
machine, and printed as ratios against the in-process baseline.

    python bench/bench_env.py [--steps 20] [--task miniwob.enter-text]
    python bench/bench_env.py --soak 600 [--soak-every 50] [--soak-max-episodes 500]
    python bench/bench_env.py --reset-phases 15 [--task miniwob.click-button]

The soak runs many episodes through one session and prints the server's memory and process
counts as it goes: flat memory and a constant number of Chromium processes mean no leak.

Steps are `fill(<textbox>, ...)` on enter-text: they change the page but never end the episode, so
every sample is a plain step (no reset). At most two browsers run at once (one env at a time).

--reset-phases N times N resets of `reset_mode="page"` in-process, phase by phase (MiniWoB's
in-page restart, the post-reset waits, each part of BrowserGym's observation, our encoding), then
the same resets over the WebSocket of one server, and task switches (a fresh context and page).
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _tree(pid: int) -> tuple[float, int, int]:
    """(RSS MiB, processes, Chromium processes) of a process and its descendants."""
    import psutil

    root = psutil.Process(pid)
    processes = [root] + root.children(recursive=True)
    rss, chromium = 0, 0
    for process in processes:
        try:
            rss += process.memory_info().rss
            chromium += "chrom" in process.name()
        except psutil.NoSuchProcess:
            continue
    return rss / 2**20, len(processes), chromium


def soak(episodes: int, every: int, max_episodes: int) -> int:
    """Many episodes through ONE session of one env server: memory and process counts of the
    server's process tree (server, Playwright driver, Chromium) every `every` episodes."""
    from envs.browsergym.client import BrowserGymEnvClient
    from envs.browsergym.config import EnvConfig
    from envs.browsergym.pool import EnvServerPool
    from envs.browsergym.scripted import run_scripted_episode

    config = EnvConfig(task="miniwob.click-button", max_sessions=1, browser_max_episodes=max_episodes)
    print(f"soak: {episodes} scripted click-button episodes through one session; browser_max_episodes={max_episodes}, "
          f"browser_max_memory_mb={config.browser_max_memory_mb:g}")
    print(f"{'episodes':>8s} {'tree RSS MiB':>12s} {'processes':>9s} {'chromium':>8s} {'success':>7s} {'recycles':>8s} {'s/episode':>9s}")
    rewards: list[float] = []
    recycles = 0
    with EnvServerPool(1, config) as pool:
        with BrowserGymEnvClient(pool.urls[0], message_timeout_s=300) as client:
            started = time.monotonic()
            for index in range(episodes):
                def count(result):
                    nonlocal recycles
                    recycles += bool(result.observation.browser_recycled)

                reward, _ = run_scripted_episode(client, "miniwob.click-button", 10_000 + index, on_reset=count)
                rewards.append(reward)
                if (index + 1) % every == 0 or index + 1 == episodes:
                    rss, processes, chromium = _tree(pool.pids[0])
                    print(f"{index + 1:8d} {rss:12.0f} {processes:9d} {chromium:8d} "
                          f"{sum(r == 1.0 for r in rewards[-every:]) / len(rewards[-every:]):7.2f} {recycles:8d} "
                          f"{(time.monotonic() - started) / (index + 1):9.2f}", flush=True)
    return 0


# Phases of a reset: (module, attribute, label). Timed by wrapping each for the run.
_RESET_PHASES = (
    ("envs.browsergym.server.browser", "PersistentBrowserEnv._restart_in_page", "MiniWoB restart (storage, seed, startEpisodeReal)"),
    ("envs.browsergym.server.browser", "PersistentBrowserEnv._wait_dom_loaded", "wait: domcontentloaded"),
    ("envs.browsergym.server.browser", "PersistentBrowserEnv._get_obs", "BrowserGym observation, of which:"),
    ("browsergym.core.env", "_pre_extract", "  mark elements (bids, visibility)"),
    ("browsergym.core.env", "extract_dom_snapshot", "  DOM snapshot"),
    ("browsergym.core.env", "extract_merged_axtree", "  accessibility tree"),
    ("envs.browsergym.server.browser", "_focused_element_bid", "  focused element"),
    ("envs.browsergym.server.browser", "_screenshot_keeping_viewport", "  screenshot"),
    ("browsergym.core.env", "_post_extract", "  unmark"),
    ("envs.browsergym.server.environment", "BrowserGymEnvironment._observation", "our observation (axtree text, PNG, elements)"),
)


def _wrap_phases(samples: dict[str, list[float]]) -> None:
    """Wrap every phase of _RESET_PHASES so that each call appends its seconds to samples[label]."""
    import importlib

    def timed(function, label):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                samples.setdefault(label, []).append(time.perf_counter() - started)
        return wrapper

    for module_name, attribute, label in _RESET_PHASES:
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, timed(getattr(owner, name), label))


def reset_phases(n: int, task: str) -> int:
    """Where an in-page reset's time goes (in-process, phase by phase), the same resets over the
    WebSocket, and task switches (the task loaded into the page, reset_mode=page; a fresh context
    and page, reset_mode=context)."""
    import os

    from envs.browsergym.client import BrowserGymEnvClient
    from envs.browsergym.config import EnvConfig
    from envs.browsergym.pool import EnvServerPool
    from envs.browsergym.server.environment import BrowserGymEnvironment

    other = "miniwob.click-test" if task != "miniwob.click-test" else "miniwob.click-button"
    samples: dict[str, list[float]] = {}
    _wrap_phases(samples)
    config = EnvConfig(task=task, reset_mode="page", max_sessions=1)
    print(f"reset phases: {n} in-page resets of {task}, reset_mode=page, load average {os.getloadavg()[0]:.1f}")
    env = BrowserGymEnvironment(config)
    try:
        env.reset(seed=1), env.reset(seed=2)  # page loaded, code warm
        samples.clear()
        total = [_timed(lambda s=seed: env.reset(seed=s)) for seed in range(100, 100 + n)]
        print(f"  {'in-process reset, total':52s} median {statistics.median(total) * 1000:6.1f} ms")
        for _, _, label in _RESET_PHASES:
            if label in samples:
                print(f"  {label:52s} median {statistics.median(samples[label]) * 1000:6.1f} ms")
        _compare_marking(env._gym_env.page, n)
        _compare_reads(env._gym_env.page, n)
        _reset_cpu(env, n)
    finally:
        env.close()
    for mode, label in (("page", "task switch: the task loaded into the page"),
                        ("context", "task switch: fresh context and page")):
        switching = BrowserGymEnvironment(dataclasses.replace(config, reset_mode=mode))
        try:
            switching.reset(seed=1)
            switches = [_timed(lambda s=seed: switching.reset(seed=s, task=(other, task)[s % 2])) for seed in range(n)]
            print(f"  {label:52s} median {statistics.median(switches) * 1000:6.1f} ms")
        finally:
            switching.close()
    with EnvServerPool(1, config) as pool, BrowserGymEnvClient(pool.urls[0], message_timeout_s=120) as client:
        client.reset(seed=1, task=task), client.reset(seed=2, task=task)
        remote = [_timed(lambda s=seed: client.reset(seed=s, task=task)) for seed in range(100, 100 + n)]
        state = [_timed(client.state) for _ in range(n)]
    print(f"  {'over the WebSocket: reset round trip':52s} median {statistics.median(remote) * 1000:6.1f} ms")
    print(f"  {'over the WebSocket: state() round trip (no browser)':52s} median {statistics.median(state) * 1000:6.1f} ms")
    return 0


def _compare_marking(page, n: int) -> None:
    """BrowserGym's element marking against ours (the short poll) on the same page, alternating."""
    import contextlib

    import browsergym.core.observation as observation

    from envs.browsergym.server import browser

    times: dict[str, list[float]] = {"stock": [], "ours": []}
    for _ in range(n):
        for label, script in (("stock", contextlib.nullcontext), ("ours", browser._fast_marking)):
            with script():
                times[label].append(_timed(lambda: observation._pre_extract(page)))
            observation._post_extract(page)
    print(f"  {'  mark elements: BrowserGym stock (40 ms poll) / ours':52s} median "
          f"{statistics.median(times['stock']) * 1000:6.1f} / {statistics.median(times['ours']) * 1000:.1f} ms")


def _compare_reads(page, n: int) -> None:
    """BrowserGym's DOM snapshot, accessibility tree and focused element read as stock (a fresh
    DevTools session per extractor, 3-4 round trips for the focus) against ours (the page's kept
    session, one call for the focus), on the same marked page, alternating."""
    import contextlib

    import browsergym.core.env as browser_env
    import browsergym.core.observation as observation

    from envs.browsergym.server import browser

    def reads():
        observation.extract_dom_snapshot(page)
        observation.extract_merged_axtree(page)
        browser_env.extract_focused_element_bid(page)

    times: dict[str, list[float]] = {"stock": [], "ours": []}
    observation._pre_extract(page)
    try:
        for _ in range(n):
            for label, swap in (("stock", contextlib.nullcontext), ("ours", lambda: browser._kept_devtools_reads(page))):
                with swap():
                    times[label].append(_timed(reads))
    finally:
        observation._post_extract(page)
    print(f"  {'  DOM + AX tree + focus: stock sessions / kept':52s} median "
          f"{statistics.median(times['stock']) * 1000:6.1f} / {statistics.median(times['ours']) * 1000:.1f} ms")


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process ("python"), Playwright's driver ("driver") and the rest
    of its descendants (Chromium)."""
    import psutil

    me = psutil.Process()
    totals = {"python": sum(me.cpu_times()[:2]), "driver": 0.0, "chromium": 0.0}
    for child in me.children(recursive=True):
        try:
            kind = "driver" if child.name() == "node" else "chromium"
            totals[kind] += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return totals


def _reset_cpu(env, n: int) -> None:
    """CPU per in-page reset: this process (BrowserGym, our encoding), Playwright's driver and
    Chromium, over n resets."""
    before = _cpu_seconds()
    for seed in range(n):
        env.reset(seed=1000 + seed)
    after = _cpu_seconds()
    parts = {k: (after[k] - before[k]) / n * 1000 for k in after}
    print(f"  {'CPU per reset (mean)':52s}        {sum(parts.values()):6.1f} ms (Python {parts['python']:.1f}, "
          f"driver {parts['driver']:.1f}, Chromium {parts['chromium']:.1f})")


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--task", default="miniwob.enter-text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soak", type=int, default=0, help="instead: run this many episodes through one session")
    parser.add_argument("--soak-every", type=int, default=50, help="soak: report every N episodes")
    parser.add_argument("--soak-max-episodes", type=int, default=500, help="soak: browser_max_episodes")
    parser.add_argument("--reset-phases", type=int, default=0, help="instead: time N in-page resets phase by phase")
    args = parser.parse_args(argv)
    if args.reset_phases:
        return reset_phases(args.reset_phases, args.task if args.task != "miniwob.enter-text" else "miniwob.click-button")
    if args.soak:
        return soak(args.soak, args.soak_every, args.soak_max_episodes)

    from envs.browsergym.config import EnvConfig
    from envs.browsergym.models import BrowserGymAction
    from envs.browsergym.server.environment import BrowserGymEnvironment

    max_steps = 2 * args.steps + 20
    env = BrowserGymEnvironment(EnvConfig(task=args.task, max_steps=max_steps))  # the baseline: no socket
    try:
        first = env.reset(seed=args.seed)

        def in_process(action: str):
            return env.step(BrowserGymAction(action_str=action))

        sizes = observation_bytes(env, in_process(f"fill('{_textbox_bid(first)}', 'bytes')"))
        phases = websocket_phases(env, in_process, args, max_steps)
    finally:
        env.close()
        from envs.browsergym.chromium import stop_global_playwright

        stop_global_playwright()  # this process's Playwright driver
    report(args, phases, sizes)
    return 0


def observation_bytes(env, observation) -> dict[str, float]:
    """The JSON the server sends for one step: without the screenshot, with our PNG, and with
    upstream OpenEnv's format (the screenshot as nested integer lists, timed to build)."""
    from openenv.core.env_server.serialization import serialize_observation

    with_png = len(json.dumps(serialize_observation(observation)).encode())
    without = len(json.dumps(serialize_observation(observation.model_copy(update={"screenshot_png_b64": ""}))).encode())
    png_bytes = len(observation.screenshot_png_b64) * 3 // 4
    raw = env._gym_env._get_obs()["screenshot"]
    started = time.perf_counter()
    nested = observation.model_copy(update={"screenshot_png_b64": "", "screenshot": raw.tolist()})
    with_nested = len(json.dumps(serialize_observation(nested)).encode())
    return {"with_png": with_png, "without": without, "png": png_bytes, "with_nested": with_nested,
            "nested_seconds": time.perf_counter() - started}


def websocket_phases(env, in_process, args: argparse.Namespace, max_steps: int) -> list:
    """The same env behind a server, over the WebSocket (with and without the screenshot), each
    timed interleaved with the in-process baseline. Returns (label, samples per setting) pairs."""
    from envs.browsergym.client import BrowserGymEnvClient
    from envs.browsergym.config import EnvConfig
    from envs.browsergym.pool import EnvServerPool

    phases = []
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
    return phases


def report(args: argparse.Namespace, phases: list, sizes: dict[str, float]) -> None:
    print(f"BrowserGym env benchmark: {args.task}, {args.steps} steps per setting (after 2 warm-up steps), one run;")
    print("each WebSocket setting is timed alternating step by step with the in-process env (same load)")
    print("step latency")
    for label, samples in phases:
        base = statistics.median(samples["in-process"])
        remote = statistics.median(samples[label])
        print(f"  in-process                 {_summary(samples['in-process'])}")
        print(f"  {label:26s} {_summary(samples[label])}   ratio vs in-process {remote / base:5.2f}x   ({(remote - base) * 1000:+.1f} ms)")
    without, with_png, with_nested = sizes["without"], sizes["with_png"], sizes["with_nested"]
    print("observation bytes per step (JSON message)")
    print(f"  without screenshot          {without:9d} B")
    print(f"  with PNG screenshot (ours)  {with_png:9d} B   ratio {with_png / without:6.2f}x   (PNG itself {sizes['png']} B)")
    print(
        f"  with nested-list screenshot {with_nested:9d} B   ratio {with_nested / without:6.2f}x   "
        f"(upstream format; {with_nested / with_png:.1f}x ours, {sizes['nested_seconds'] * 1000:.0f} ms to build + encode)"
    )


if __name__ == "__main__":
    sys.exit(main())
