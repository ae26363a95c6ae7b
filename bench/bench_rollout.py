"""Rollout throughput: the seed gist's sequential pattern vs this project's configuration, in one run.

    .venv/bin/python bench/bench_rollout.py [--scripted-episodes 36] [--scripted-sessions 2]
        [--groups 2] [--group-size 4] [--max-steps 3] [--engine transformers] [--skip-engine]

Part 1, the env side with a scripted policy (no engine; envs/browsergym/scripted.py, six MiniWoB
tasks in turn): the seed's pattern (one env session, episodes one after another, BrowserGym's
stock reset that relaunches Chromium and a chat-window Chromium every episode) against K sessions
that never wait for each other, each keeping one Chromium with a fresh context per episode
(EnvConfig.reset_mode="context"), the same keeping the page across MiniWoB episodes ("page", the
default: an in-page restart, or a navigation when the task changes), and "page" text-only (no
screenshot captured: what a text-only model's run gets). Prints episodes/s
and its ratio, the success rate (must not change), reset and step medians (WebSocket round trips)
and the share of episode time in reset.

Part 2, with an engine. Same tiny VLM (built offline), same task (MiniWoB click-test), same prompts
and parser, same number of episodes everywhere:

  (a) gist:       one env session stepped sequentially inside a "rollout function"; one engine
                  call per step with a single prompt (what a TRL `rollout_func` over one env does),
                  BrowserGym's stock reset
  (b) worker K=2: one RolloutWorker, 2 env sessions, prompts of live episodes batched
      worker K=4: one RolloutWorker, 4 env sessions
  (c) 2 workers:  two RolloutWorker Ray actors (K=2 each) running different groups at once

Prints episodes/s and the ratio to (a), then where the time goes, from the recorded step timings:
engine (time an episode waited for its action, batching included; and the engine's busy time),
env (step round trips: browser + WebSocket), transport (a WebSocket round trip that touches no
browser, measured separately), and the rest (resets, prompt building, parsing, bookkeeping).
The policy is a random tiny model, so nearly every step is the parser's fallback `noop(0)`:
browser time is real page work (screenshot, accessibility tree), not a sleep.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for the CPU engine, in every configuration (and in the Ray workers): with
# browsers and other processes on 2 cores, torch's default thread team made single generate calls
# vary 0.05-3 s from one minute to the next, which would swamp the comparison.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TASK = "miniwob.click-test"


def _rollout_config(num_sessions: int, max_steps: int):
    from actors.config import RolloutConfig

    return RolloutConfig(num_sessions=num_sessions, max_steps=max_steps, step_timeout_s=120.0,
                         episode_timeout_s=900.0, fallback_action="noop(0)",
                         write_viewer=False)


def _summary(name: str, trajectories, wall_s: float, engine_busy_s: float | None, engine_calls: int | None,
             reset_s: float):
    steps = [s for t in trajectories for s in t.steps]
    return {
        "name": name,
        "episodes": len(trajectories),
        "failed": sum(t.status == "failed" for t in trajectories),
        "steps": len(steps),
        "wall_s": wall_s,
        "eps_per_s": len(trajectories) / wall_s,
        "steps_per_s": len(steps) / wall_s,
        "engine_wait_s": sum(s.engine_s for s in steps),
        "env_s": sum(s.env_s for s in steps),
        "episode_s": sum(t.wall_s for t in trajectories),
        "engine_busy_s": engine_busy_s,
        "mean_batch": (len(steps) / engine_calls) if engine_calls else None,
        "reset_s": reset_s,
    }


def bench_gist(engine_config, env_config, groups, group_size, max_steps, seeds):
    """(a) one env, episodes one after another, one prompt per engine call."""
    from actors.action_parser import ActionParser
    from actors.engines import create_engine
    from actors.episode import run_episode
    from actors.rollout_worker import ClientEnvSession
    from core.trajectory import new_id
    from envs.browsergym.pool import EnvServerPool

    cfg = _rollout_config(1, max_steps)
    parser = ActionParser(cfg.allowed_actions, cfg.max_action_chars, fallback_action=cfg.fallback_action)
    engine = create_engine(engine_config)
    busy = [0.0, 0]
    resets = [0.0]

    def generate(request):
        t0 = time.monotonic()
        out = engine.generate([request], cfg.sampling)[0]
        busy[0] += time.monotonic() - t0
        busy[1] += 1
        return out

    with EnvServerPool(1, dataclasses.replace(env_config, reset_mode="relaunch")) as pool:
        session = ClientEnvSession(pool.urls[0], cfg.connect_timeout_s, cfg.step_timeout_s,
                                   on_reset=lambda sec: resets.__setitem__(0, resets[0] + sec))
        try:
            def one_group(seed):
                gid = new_id()
                return [run_episode(session, generate, task=TASK, seed=seed, episode_id=new_id(), group_id=gid,
                                    config=cfg, parser=parser, worker_id="gist") for _ in range(group_size)]

            # The rollout runs on one non-main thread, as the worker's engine calls do: on this
            # oversubscribed 2-core machine a transformers generate issued from the main thread
            # measured 10-30x slower than the same call from a fresh thread (intra-op thread
            # team spinning), which would otherwise dominate the comparison.
            with ThreadPoolExecutor(max_workers=1) as rollout_thread:
                rollout_thread.submit(one_group, seeds[0]).result()  # warm-up: browser, engine
                busy[:] = [0.0, 0]
                resets[0] = 0.0
                t0 = time.monotonic()
                trajs = rollout_thread.submit(
                    lambda: [t for seed in seeds[1 : groups + 1] for t in one_group(seed)]).result()
                wall = time.monotonic() - t0
            transport = _transport_round_trip(session)
        finally:
            session.client.close()
    engine.close()
    return _summary("(a) gist: 1 env, sequential", trajs, wall, busy[0], busy[1], resets[0]), transport


def _transport_round_trip(session, n: int = 20) -> float:
    """Median seconds of a WebSocket `state()` round trip: no browser work, just the transport."""
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        session.client.state()
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def bench_worker(engine_config, env_config, k, groups, group_size, max_steps, seeds, run_dir):
    """(b) one RolloutWorker with K sessions."""
    from actors.rollout_worker import RolloutWorker

    with RolloutWorker(f"bench-k{k}", _rollout_config(k, max_steps), engine_config, env_config,
                       run_dir / f"k{k}") as worker:
        worker.run_group(TASK, seeds[0], group_size)  # warm-up
        before = worker.stats()
        t0 = time.monotonic()
        trajs = [t for seed in seeds[1 : groups + 1] for t in worker.run_group(TASK, seed, group_size).trajectories]
        wall = time.monotonic() - t0
        after = worker.stats()
    return _summary(f"(b) 1 worker, K={k}", trajs, wall, after["engine_busy_s"] - before["engine_busy_s"],
                    after["engine_calls"] - before["engine_calls"], after["reset_s"] - before["reset_s"])


def bench_two_workers(engine_config, env_config, k, groups, group_size, max_steps, seeds, run_dir):
    """(c) two RolloutWorker Ray actors, each running its share of the groups at the same time."""
    import ray

    from actors.rollout_worker import RolloutWorkerActor

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                       "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}})
    try:
        workers = [RolloutWorkerActor.options(num_cpus=1).remote(
            f"bench-w{i}", _rollout_config(k, max_steps), engine_config, env_config, str(run_dir / f"w{i}"))
            for i in range(2)]
        ray.get([w.run_group.remote(TASK, seeds[0], group_size) for w in workers])  # warm-up
        before = ray.get([w.stats.remote() for w in workers])
        t0 = time.monotonic()
        # Same total: the groups are split between the two workers.
        refs = [workers[i % 2].run_group.remote(TASK, seed, group_size) for i, seed in enumerate(seeds[1 : groups + 1])]
        trajs = [t for g in ray.get(refs) for t in g.trajectories]
        wall = time.monotonic() - t0
        after = ray.get([w.stats.remote() for w in workers])
        ray.get([w.close.remote() for w in workers])
    finally:
        ray.shutdown()
    busy = sum(a["engine_busy_s"] - b["engine_busy_s"] for a, b in zip(after, before))
    calls = sum(a["engine_calls"] - b["engine_calls"] for a, b in zip(after, before))
    reset_s = sum(a["reset_s"] - b["reset_s"] for a, b in zip(after, before))
    return _summary(f"(c) 2 workers (Ray), K={k} each", trajs, wall, busy, calls, reset_s)


class _TimedClient:
    """An env client with every reset and step timed (the scripted policy's session)."""

    def __init__(self, client):
        self.client, self.resets, self.steps = client, [], []

    def reset(self, **kwargs):
        t0 = time.monotonic()
        result = self.client.reset(**kwargs)
        self.resets.append(time.monotonic() - t0)
        return result

    def step(self, action):
        from envs.browsergym.models import BrowserGymAction

        t0 = time.monotonic()
        result = self.client.step(BrowserGymAction(action_str=action))
        self.steps.append(time.monotonic() - t0)
        return result


def _scripted_sessions(url_per_session: list[str], episodes: list[tuple[str, int]], max_steps: int) -> dict:
    """Play `episodes` (task, seed) with the scripted policy over one client per session, each
    session on its own thread taking the next episode from a shared queue (sessions never wait for
    each other). Returns timings: per-reset and per-step seconds, per-episode wall, rewards."""
    import queue
    import threading

    todo: "queue.Queue[tuple[str, int]]" = queue.Queue()
    for item in episodes:
        todo.put(item)
    lock = threading.Lock()
    out = {"reset_s": [], "step_s": [], "episode_s": [], "rewards": [], "errors": []}
    threads = [threading.Thread(target=_scripted_session, args=(url, todo, lock, out, max_steps))
               for url in url_per_session]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out["wall_s"] = time.monotonic() - t0
    return out


def _scripted_session(url: str, todo, lock, out: dict, max_steps: int) -> None:
    """One session's thread of `_scripted_sessions`: episodes from `todo` until it is empty;
    timings, rewards and errors go into `out` under `lock`."""
    import queue

    from envs.browsergym.client import BrowserGymEnvClient
    from envs.browsergym.scripted import run_scripted_episode

    with BrowserGymEnvClient(url, message_timeout_s=300) as client:
        timed = _TimedClient(client)
        while True:
            try:
                task, seed = todo.get_nowait()
            except queue.Empty:
                break
            t0 = time.monotonic()
            try:
                reward, _ = run_scripted_episode(timed, task, seed, max_steps=max_steps)
            except Exception as exc:  # noqa: BLE001 - counted and shown, the bench goes on
                reward = 0.0
                with lock:
                    out["errors"].append(f"{task} seed {seed}: {type(exc).__name__}: {exc}")
            with lock:
                out["episode_s"].append(time.monotonic() - t0)
                out["rewards"].append(reward)
        with lock:
            out["reset_s"] += timed.resets
            out["step_s"] += timed.steps


def bench_scripted(episodes: int, sessions: int, max_steps: int) -> list[dict]:
    """The env side alone, with the scripted policy (no engine): the seed's pattern (one env
    session, episodes one after another, BrowserGym's stock reset that relaunches Chromium twice)
    against this project's configurations (K sessions that never wait for each other, one kept
    Chromium per session, a fresh context per episode or the page kept). Same episodes, same step
    settings."""
    from envs.browsergym.config import EnvConfig
    from envs.browsergym.pool import EnvServerPool
    from envs.browsergym.scripted import SCRIPTED_TASKS

    # Runs of 6 episodes of one task (as a GRPO group of one task would be), different seeds.
    plan = [(SCRIPTED_TASKS[(i // 6) % len(SCRIPTED_TASKS)], 5000 + i) for i in range(episodes)]
    warmup = [(task, 1) for task in SCRIPTED_TASKS[:2]]
    results = []
    # The last row is what a text-only model's run gets (`bgrpo train` turns the env's screenshot
    # off when the prompt does not show it): no screenshot captured.
    for name, reset_mode, k, screenshot in (("seed pattern: 1 env, stock reset", "relaunch", 1, True),
                                            (f"this project: K={sessions}, context reset", "context", sessions, True),
                                            (f"this project: K={sessions}, page reset", "page", sessions, True),
                                            (f"K={sessions}, page reset, text-only", "page", sessions, False)):
        config = EnvConfig(task=TASK, reset_mode=reset_mode, max_steps=max_steps, max_sessions=1,
                           include_screenshot=screenshot)
        with EnvServerPool(k, config) as pool:
            _scripted_sessions(list(pool.urls), warmup * k, max_steps)  # browsers up, code warm
            run = _scripted_sessions(list(pool.urls), plan, max_steps)
        run["name"] = name
        results.append(run)
        print(f"  done: {name}", flush=True)
    return results


def print_scripted(results: list[dict]) -> None:
    base = len(results[0]["rewards"]) / results[0]["wall_s"]
    print()
    print("env throughput with the scripted policy (no engine): episodes of the scripted tasks, success = reward 1.0")
    print("reset share = the sessions' time in reset (round trips; a session does nothing else meanwhile) over "
          "their episode time")
    print(f"{'configuration':38s} {'episodes':>8s} {'success':>7s} {'wall s':>7s} {'eps/s':>6s} {'x seed':>6s} "
          f"{'reset med':>9s} {'reset mean':>10s} {'step med':>8s} {'reset share':>11s}")
    for r in results:
        n = len(r["rewards"])
        eps = n / r["wall_s"]
        share = sum(r["reset_s"]) / max(sum(r["episode_s"]), 1e-9)
        print(f"{r['name']:38s} {n:8d} {sum(x == 1.0 for x in r['rewards']) / max(n, 1):7.2f} {r['wall_s']:7.1f} "
              f"{eps:6.2f} {eps / base:6.2f} {statistics.median(r['reset_s']):8.3f}s {statistics.mean(r['reset_s']):9.3f}s "
              f"{statistics.median(r['step_s']):7.3f}s {100 * share:10.1f}%")
        for error in r["errors"][:5]:
            print(f"    error: {error}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=2, help="timed groups per configuration (after one warm-up)")
    ap.add_argument("--group-size", type=int, default=4, help="G: episodes per group")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--sessions", default="2,4", help="K values for (b)")
    ap.add_argument("--skip-ray", action="store_true", help="skip (c)")
    ap.add_argument("--scripted-episodes", type=int, default=36, help="part 1: timed episodes per configuration")
    ap.add_argument("--scripted-sessions", type=int, default=2, help="part 1: K sessions of this project's configuration")
    ap.add_argument("--skip-engine", action="store_true", help="run part 1 only")
    ap.add_argument("--skip-scripted", action="store_true", help="skip part 1")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from actors.engines import EngineConfig
    from actors.tiny_models import build_tiny_vl_model
    from envs.browsergym.config import EnvConfig

    engine_config = EngineConfig(model=str(build_tiny_vl_model()), backend=args.engine)
    env_config = EnvConfig(task=TASK)
    seeds = list(range(100, 101 + args.groups))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    print(f"task {TASK}, G={args.group_size}, {args.groups} timed groups, max_steps {args.max_steps}, "
          f"engine {args.engine}, tiny VLM, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    if not args.skip_scripted:
        print_scripted(bench_scripted(args.scripted_episodes, args.scripted_sessions, args.max_steps + 2))
    if args.skip_engine:
        return 0

    results = []
    gist, transport_s = bench_gist(engine_config, env_config, args.groups, args.group_size, args.max_steps, seeds)
    results.append(gist)
    print(f"  done: {gist['name']}", flush=True)
    for k in [int(x) for x in args.sessions.split(",") if x]:
        results.append(bench_worker(engine_config, env_config, k, args.groups, args.group_size, args.max_steps,
                                    seeds, run_dir))
        print(f"  done: {results[-1]['name']}", flush=True)
    if not args.skip_ray:
        results.append(bench_two_workers(engine_config, env_config, 2, args.groups, args.group_size,
                                         args.max_steps, seeds, run_dir))
        print(f"  done: {results[-1]['name']}", flush=True)
    print_engine_runs(results)
    print_time_split(results, transport_s)
    return 0


def print_engine_runs(results: list[dict]) -> None:
    """Throughput of each configuration with the engine, relative to (a) the gist's loop."""
    base = results[0]["eps_per_s"]
    print()
    print("with the tiny VLM engine ((a) uses BrowserGym's stock reset, the workers the default reset_mode=page)")
    print(f"{'configuration':34s} {'episodes':>8s} {'failed':>6s} {'steps':>5s} {'wall s':>7s} {'eps/s':>7s} "
          f"{'x gist':>6s} {'batch':>5s}")
    for r in results:
        batch = f"{r['mean_batch']:.2f}" if r["mean_batch"] else "-"
        print(f"{r['name']:34s} {r['episodes']:8d} {r['failed']:6d} {r['steps']:5d} {r['wall_s']:7.1f} "
              f"{r['eps_per_s']:7.3f} {r['eps_per_s'] / base:6.2f} {batch:>5s}")


def print_time_split(results: list[dict], transport_s: float) -> None:
    """Where each configuration's episode time went: engine wait, env step (browser + transport),
    env reset, and the rest."""
    print()
    print("where the time goes (sums over episodes; per step in brackets)")
    print(f"  transport: WebSocket state() round trip, median {transport_s * 1000:.1f} ms (no browser work; "
          "serialising the observation is inside 'env step': bench/bench_env.py splits it)")
    for r in results:
        n = max(r["steps"], 1)
        ep = max(r["episode_s"], 1e-9)
        env_browser = max(r["env_s"] - n * transport_s, 0.0)
        rest = max(r["episode_s"] - r["engine_wait_s"] - r["env_s"] - r["reset_s"], 0.0)
        print(f"  {r['name']}")
        calls = n / r["mean_batch"] if r["mean_batch"] else n
        print(f"    engine wait {r['engine_wait_s']:7.1f} s ({r['engine_wait_s'] / n:.2f}/step, "
              f"{100 * r['engine_wait_s'] / ep:4.1f}%) | engine busy {r['engine_busy_s']:.1f} s "
              f"({100 * r['engine_busy_s'] / r['wall_s']:.0f}% of wall, {r['engine_busy_s'] / calls:.2f} s/call)")
        print(f"    env step    {r['env_s']:7.1f} s ({r['env_s'] / n:.2f}/step, {100 * r['env_s'] / ep:4.1f}%) "
              f"= browser ~{env_browser:.1f} s + transport ~{n * transport_s:.1f} s")
        print(f"    env reset   {r['reset_s']:7.1f} s ({r['reset_s'] / max(r['episodes'], 1):.2f}/episode, "
              f"{100 * r['reset_s'] / ep:4.1f}%)")
        print(f"    other       {rest:7.1f} s ({100 * rest / ep:4.1f}%)  (prompt building, parsing, queueing)")


if __name__ == "__main__":
    sys.exit(main())
