"""`bgrpo demo`: a scripted MiniWoB episode end to end through a real env server.

Starts a pool of one BrowserGym OpenEnv server (real Chromium), connects over the WebSocket,
plays each task with the scripted policy, prints goal, actions and reward, and stops the server
and its browsers. Exit code 0 only when every episode scored 1.0.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from envs.browsergym.scripted import SCRIPTED_TASKS

DEFAULT_TASKS = ("miniwob.click-test", "miniwob.click-button", "miniwob.enter-text")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bgrpo demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks (scripted ones: " + ", ".join(SCRIPTED_TASKS) + ")")
    parser.add_argument("--all", action="store_true", help="run every scripted task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chromium-path", default=None, help="Chromium binary (default: auto)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per env call")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    from envs.browsergym.client import BrowserGymEnvClient, EnvClientError
    from envs.browsergym.config import EnvConfig, qualify_task_name
    from envs.browsergym.pool import EnvServerPool
    from envs.browsergym.scripted import NoScriptedAction, run_scripted_episode

    tasks = list(SCRIPTED_TASKS) if args.all else [qualify_task_name(t) for t in args.tasks.split(",") if t.strip()]
    config = EnvConfig(task=tasks[0], chromium_path=args.chromium_path)
    started = time.monotonic()
    print(f"starting 1 env server (task {tasks[0]}) ...", flush=True)
    failures = 0
    with EnvServerPool(1, config) as pool:
        print(f"env server up at {pool.urls[0]} in {time.monotonic() - started:.1f} s; episodes over {pool.urls[0]}/ws", flush=True)
        client = BrowserGymEnvClient(pool.urls[0], message_timeout_s=args.timeout)
        try:
            for task in tasks:
                print(f"\n== {task} (seed {args.seed})")

                def show(action, result):
                    error = f"  error: {result.observation.error}" if result.observation.last_action_error else ""
                    print(f"   action: {action}  -> reward {result.reward}, done {result.done}{error}")

                def show_first(result):
                    observation = result.observation
                    print(f"   goal: {observation.goal}")
                    print(
                        f"   page: {len(observation.clickable_elements)} clickable elements, "
                        f"screenshot {len(observation.screenshot_png_b64) * 3 // 4} bytes PNG"
                    )

                try:
                    reward, actions = run_scripted_episode(client, task, args.seed, on_reset=show_first, on_step=show)
                except (EnvClientError, NoScriptedAction) as e:
                    print(f"   FAILED: {type(e).__name__}: {e}")
                    failures += 1
                    continue
                print(f"   reward {reward} after {len(actions)} action(s)")
                failures += reward != 1.0
        finally:
            client.close()
    print(f"\n{len(tasks) - failures}/{len(tasks)} episodes solved; servers and browsers stopped ({time.monotonic() - started:.1f} s)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
