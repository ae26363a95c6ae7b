"""The BrowserGym env server: openenv-core's FastAPI app around BrowserGymEnvironment.

    bgrpo env-server --task miniwob.click-test --host 127.0.0.1 --port 8000
    bgrpo-env-server --task click-button --port 0 --port-file /tmp/port   (port 0 = any free port)

Episodes run over the WebSocket session at /ws (one env, i.e. one pair of browsers, per
connection). openenv's HTTP POST /reset and /step build a fresh env per request and close it from
another thread (which leaks BrowserGym's browsers), so they are replaced by a 409 answer that
points to /ws. GET /health, /schema, /metadata and /state stay.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

logger = logging.getLogger("envs.browsergym.server")


def build_app(config):
    """The FastAPI app serving `config` (an EnvConfig) over OpenEnv's routes."""
    from fastapi.responses import JSONResponse
    from openenv.core.env_server.http_server import create_fastapi_app
    from openenv.core.env_server.types import ConcurrencyConfig

    from envs.browsergym.models import BrowserGymAction, BrowserGymObservation
    from envs.recorded.environment import RecordedEnvironment, is_recorded_task

    config.validate()
    # The configured task decides what this server runs: `recorded.*` replays a recorded page
    # without a browser (machines without Chromium); anything else is BrowserGym.
    if is_recorded_task(config.task):
        environment = RecordedEnvironment
    else:
        from envs.browsergym.server.environment import BrowserGymEnvironment as environment
    # A functools.partial of the class lets openenv see REQUIRES_SINGLE_THREAD_EXECUTOR.
    factory = functools.partial(environment, config)
    app = create_fastapi_app(
        factory,
        BrowserGymAction,
        BrowserGymObservation,
        concurrency_config=ConcurrencyConfig(
            max_concurrent_envs=config.max_sessions, session_timeout=config.session_timeout_s
        ),
    )

    stateless = {("/reset", "POST"), ("/step", "POST")}
    app.router.routes = [
        route
        for route in app.router.routes
        if not any((getattr(route, "path", None), m) in stateless for m in (getattr(route, "methods", None) or ()))
    ]

    async def use_websocket() -> JSONResponse:
        return JSONResponse(
            status_code=409,
            content={
                "error": "stateless HTTP reset/step are disabled for BrowserGym: each request would "
                "launch and leak a browser. Open a WebSocket session at /ws (openenv EnvClient / "
                "envs.browsergym.client.BrowserGymEnvClient)."
            },
        )

    for path in ("/reset", "/step"):
        app.add_api_route(path, use_websocket, methods=["POST"], include_in_schema=False)
    return app


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bgrpo env-server",
        description="Start one BrowserGym OpenEnv server (episodes over the WebSocket at /ws).",
    )
    parser.add_argument("--task", default=None, help="default task, e.g. miniwob.click-test (reset(task=...) can switch)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port; see --port-file)")
    parser.add_argument("--port-file", default=None, help="write the bound port here once listening")
    parser.add_argument("--config-json", default=None, help="a full EnvConfig as JSON (flags below override it)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--action-subsets", default=None, help="comma-separated BrowserGym action subsets")
    parser.add_argument("--max-sessions", type=int, default=None, help="concurrent WebSocket sessions")
    parser.add_argument("--chromium-path", default=None)
    parser.add_argument("--slow-mo", type=int, default=None, help="Playwright slow-mo in ms (default 0)")
    parser.add_argument("--pre-observation-delay", type=float, default=None, help="seconds (default 0)")
    parser.add_argument("--no-screenshot", action="store_true", help="do not send screenshots")
    parser.add_argument("--headed", action="store_true", help="show the browser windows")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone (used by the pool)")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    """EnvConfig from --config-json plus the individual flags."""
    from envs.browsergym.config import EnvConfig

    config = EnvConfig.from_json(args.config_json) if args.config_json else EnvConfig()
    overrides = {
        "task": args.task,
        "max_steps": args.max_steps,
        "max_sessions": args.max_sessions,
        "chromium_path": args.chromium_path,
        "slow_mo": args.slow_mo,
        "pre_observation_delay": args.pre_observation_delay,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    if args.action_subsets:
        config.action_subsets = [s.strip() for s in args.action_subsets.split(",") if s.strip()]
    if args.no_screenshot:
        config.include_screenshot = False
    if args.headed:
        config.headless = False
    return config.validate()


def _kill_own_browsers() -> None:
    # The pool tags each server's environment; the browsers inherit the tag (Playwright starts them
    # in their own sessions, out of our process group).
    from envs.browsergym.pool import SERVER_TAG_VAR, kill_tagged_processes

    tag = os.environ.get(SERVER_TAG_VAR)
    if tag:
        kill_tagged_processes(SERVER_TAG_VAR, tag, timeout_s=3.0)


def _watch_parent(parent_pid: int) -> None:
    # If the pool's process dies without stopping us (SIGKILL), stop our browsers and exit instead
    # of leaving orphans.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            logger.warning("parent process %d is gone; stopping browsers and exiting", parent_pid)
            _kill_own_browsers()
            os._exit(1)


def main(argv: Optional[list[str]] = None) -> int:
    """Run one server until SIGTERM/SIGINT. Returns the exit code."""
    args = _parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"bgrpo env-server: invalid configuration: {e}", file=sys.stderr)
        return 2

    import uvicorn

    app = build_app(config)
    # Bind ourselves so that --port 0 works and the pool learns the port without racing.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"bgrpo env-server: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    sock.listen(128)
    port = sock.getsockname()[1]
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True, name="parent-watch").start()
    print(f"bgrpo env-server: task {config.task} on http://{args.host}:{port} (WebSocket /ws)", flush=True)

    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False, ws_max_size=16 * 1024 * 1024))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal; turn both into
    # exceptions so the `finally` below runs instead of the default die-at-once handler.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return 130
    finally:
        _kill_own_browsers()  # sessions close their envs on shutdown; this catches the rest
    return 0


def cli() -> None:
    """Console script `bgrpo-env-server`."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
