"""Client of the BrowserGym env server: an openenv-core `EnvClient` with a synchronous face.

    client = BrowserGymEnvClient("http://127.0.0.1:8000", message_timeout_s=60)
    result = client.reset(seed=3, task="miniwob.click-button")
    result = client.step(BrowserGymAction(action_str="click('13')"))
    client.close()

openenv's client is async (WebSocket). Rollout workers call envs from threads, one client per
session, so `reset/step/state/close` here are blocking: each client runs its coroutines on its own
small event-loop thread. The async originals stay available as `areset/astep/astate/aclose`.
Failures come out as one of two exceptions, always within the timeouts:
- EnvConnectionError (EnvTimeoutError for a hang): the server is unreachable, died or stopped
  answering; the session is gone, the connection is dropped, a later call reconnects.
- EnvServerError: the server answered with an error (bad reset arguments, a browser that crashed).
  Its subclass EnvEpisodeMismatchError: the episode a reset started is not the task instance asked
  for, or the server cannot say which one it is.

An episode is the task it claims to be: `reset(seed=, task=)` checks the task and seed the server
reports (observation, else its state) against the request. Upstream OpenEnv's BrowserGym server
fixes its task when it starts (BROWSERGYM_TASK_NAME), drops an unknown reset argument and reports
no seed; without the check a run would train on one task while recording another.
Clients never import server code (upstream OpenEnv's rule).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import threading
from typing import Any, Coroutine, Optional

from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient

from envs.browsergym.models import BrowserGymAction, BrowserGymObservation, BrowserGymState


class EnvClientError(RuntimeError):
    """Base of the errors raised by BrowserGymEnvClient."""


class EnvConnectionError(EnvClientError):
    """The server could not be reached, closed the connection or died."""


class EnvTimeoutError(EnvConnectionError):
    """The server did not answer within the timeout (hung or overloaded)."""


class EnvServerError(EnvClientError):
    """The server answered with an error message."""


class EnvEpisodeMismatchError(EnvServerError):
    """The server started another task or seed than the reset asked for, or does not report which
    (it cannot switch tasks, or cannot tell): the episode must not be used."""


def _qualified(task: str, benchmark: str = "") -> str:
    # "click-test" + benchmark "miniwob" (upstream's state) -> "miniwob.click-test"; the client
    # cannot import the server's qualify_task_name, so the same rule lives here.
    task = task.strip().removeprefix("browsergym/")
    return task if "." in task else f"{benchmark or 'miniwob'}.{task}"


_OBSERVATION_FIELDS = set(BrowserGymObservation.model_fields)


async def _cancel_pending_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _png_from_nested_lists(pixels: Any) -> str:
    # An upstream server sends the screenshot as nested integer lists: convert once, here.
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class BrowserGymEnvClient(EnvClient[BrowserGymAction, BrowserGymObservation, BrowserGymState]):
    """Synchronous WebSocket client of one BrowserGym session (ours or upstream OpenEnv's server)."""

    def __init__(
        self,
        base_url: str,
        connect_timeout_s: float = 10.0,
        message_timeout_s: float = 60.0,
        max_message_size_mb: float = 64.0,
        trust_unreported_seed: bool = False,
    ):
        """`trust_unreported_seed`: accept a server that reports no seed (upstream OpenEnv's passes
        the seed to BrowserGym but never reports it); the task is checked regardless."""
        super().__init__(
            base_url,
            connect_timeout_s=connect_timeout_s,
            message_timeout_s=message_timeout_s,
            max_message_size_mb=max_message_size_mb,
        )
        self.base_url = base_url
        self.connect_timeout_s = connect_timeout_s
        self.trust_unreported_seed = trust_unreported_seed
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # one call at a time per client (one session)

    @property
    def message_timeout_s(self) -> float:
        """Seconds to wait for each answer (settable, e.g. short steps after a slow reset)."""
        return self._message_timeout

    @message_timeout_s.setter
    def message_timeout_s(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("message_timeout_s must be > 0")
        self._message_timeout = seconds

    # --- openenv EnvClient hooks ---

    def _step_payload(self, action: BrowserGymAction) -> dict[str, Any]:
        return {"action_str": action.action_str, "metadata": action.metadata}

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[BrowserGymObservation]:
        data = dict(payload.get("observation") or {})
        fields = {k: v for k, v in data.items() if k in _OBSERVATION_FIELDS}
        if not fields.get("screenshot_png_b64") and fields.get("screenshot"):
            fields["screenshot_png_b64"] = _png_from_nested_lists(fields["screenshot"])
        observation = BrowserGymObservation(
            **{k: v for k, v in fields.items() if k not in ("done", "reward")},
            done=bool(payload.get("done", False)),
            reward=payload.get("reward"),
        )
        return StepResult(observation=observation, reward=payload.get("reward"), done=bool(payload.get("done", False)))

    def _parse_state(self, payload: dict[str, Any]) -> BrowserGymState:
        return BrowserGymState(**payload)

    async def _send_and_receive(self, message: dict[str, Any]) -> dict[str, Any]:
        # Like the base class, but a server that refuses the session (at capacity) sends its error
        # and closes at once: our send then fails, yet the error is waiting to be read.
        from websockets.exceptions import ConnectionClosed

        await self._ensure_connected()
        assert self._ws is not None
        try:
            await self._ws.send(json.dumps(message))
        except ConnectionClosed:
            pass  # _receive returns the buffered error, or raises ConnectionClosed
        response = await self._receive()
        if response.get("type") == "error":
            data = response.get("data", {})
            raise RuntimeError(f"Server error: {data.get('message', 'Unknown error')} (code: {data.get('code', 'UNKNOWN')})")
        return response

    async def _ensure_connected(self) -> None:
        # The base class calls `self.connect()`, which is our blocking version: use the async one.
        if self._ws is None:
            await EnvClient.connect(self)

    # --- synchronous API ---

    def connect(self) -> "BrowserGymEnvClient":  # type: ignore[override]
        """Open the WebSocket session now (otherwise the first call does)."""
        self._call(super().connect(), "connect")
        return self

    def reset(  # type: ignore[override]
        self, seed: Optional[int] = None, task: Optional[str] = None, **kwargs: Any
    ) -> StepResult[BrowserGymObservation]:
        """Start an episode; `task` switches the task for this episode (default: the server's).
        The episode is checked to be that task and seed: EnvEpisodeMismatchError otherwise."""
        if seed is not None:
            kwargs["seed"] = seed
        if task is not None:
            kwargs["task"] = task
            # Upstream OpenEnv's name and form of the same argument (newer upstream servers switch
            # with it; ours read `task` first).
            kwargs.setdefault("task_name", task.split(".", 1)[1] if "." in task else task)
        result = self._call(super().reset(**kwargs), "reset")
        self._check_episode(result.observation, task, seed)
        return result

    def _check_episode(self, observation: BrowserGymObservation, task: Optional[str], seed: Optional[int]) -> None:
        """Raises EnvEpisodeMismatchError unless the episode is the requested task and seed."""
        if task is None and seed is None:
            return
        reported_task, reported_seed = observation.task_name, observation.seed
        if (task is not None and not reported_task) or (seed is not None and reported_seed is None):
            state = self.state()  # upstream servers name their task only in the state
            reported_task = reported_task or (_qualified(state.task_name, state.benchmark) if state.task_name else "")
            reported_seed = reported_seed if reported_seed is not None else state.seed
        where = f"reset on {self.base_url}"
        if task is not None:
            if not reported_task:
                raise EnvEpisodeMismatchError(
                    f"{where}: asked for task {task!r}, but the server reports no task for the episode it "
                    "started (neither the observation's task_name nor the state's), so it cannot be checked; "
                    "use a server that reports its task (this project's server, or upstream OpenEnv's started "
                    "with BROWSERGYM_TASK_NAME)")
            if _qualified(reported_task) != _qualified(task):
                raise EnvEpisodeMismatchError(
                    f"{where}: asked for task {task!r}, the server started {reported_task!r}: it does not "
                    "switch tasks (upstream OpenEnv's server fixes its task at start with BROWSERGYM_TASK_NAME "
                    "and drops the task argument); route the task to a server that serves it "
                    "(cluster.env_server_tasks)")
        if seed is not None:
            if reported_seed is None:
                if not self.trust_unreported_seed:
                    raise EnvEpisodeMismatchError(
                        f"{where}: asked for seed {seed}, but the server does not report the episode's seed, "
                        "so the GRPO group's instance cannot be checked; set cluster.env_server_trust_seed "
                        "true if this server is known to pass the seed to BrowserGym (upstream OpenEnv's does)")
            elif int(reported_seed) != int(seed):
                raise EnvEpisodeMismatchError(
                    f"{where}: asked for seed {seed}, the server started seed {reported_seed}")

    def step(self, action: BrowserGymAction | str, **kwargs: Any) -> StepResult[BrowserGymObservation]:  # type: ignore[override]
        """Send one action (a BrowserGymAction or its action string)."""
        if isinstance(action, str):
            action = BrowserGymAction(action_str=action)
        return self._call(super().step(action, **kwargs), "step")

    def state(self) -> BrowserGymState:  # type: ignore[override]
        """The server's episode state."""
        return self._call(super().state(), "state")

    def close(self) -> None:  # type: ignore[override]
        """Close the session (the server closes its browsers) and stop the loop thread."""
        loop = self._loop
        if loop is not None and self._loop_thread is not None and self._loop_thread.is_alive():
            try:
                future = asyncio.run_coroutine_threadsafe(super().close(), loop)
                future.result(timeout=self.connect_timeout_s + 5.0)
            except Exception:
                pass  # closing a dead connection: nothing left to release
            try:  # websockets' keepalive and close tasks must finish before the loop stops
                asyncio.run_coroutine_threadsafe(_cancel_pending_tasks(), loop).result(timeout=5.0)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
            self._loop_thread.join(timeout=5.0)
            if not self._loop_thread.is_alive():
                loop.close()
        self._loop = None
        self._loop_thread = None
        self._ws = None

    def sync(self) -> "BrowserGymEnvClient":  # type: ignore[override]
        """Already synchronous."""
        return self

    def __enter__(self) -> "BrowserGymEnvClient":  # type: ignore[override]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[override]
        self.close()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)

    # --- async originals ---

    async def areset(self, **kwargs: Any) -> StepResult[BrowserGymObservation]:
        return await EnvClient.reset(self, **kwargs)

    async def astep(self, action: BrowserGymAction) -> StepResult[BrowserGymObservation]:
        return await EnvClient.step(self, action)

    async def astate(self) -> BrowserGymState:
        return await EnvClient.state(self)

    async def aclose(self) -> None:
        await EnvClient.close(self)

    # --- plumbing ---

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None and self._loop_thread is not None and self._loop_thread.is_alive():
            return self._loop
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="bgym-client-loop", daemon=True)
        thread.start()
        self._loop, self._loop_thread = loop, thread
        return loop

    def _call(self, coro: Coroutine[Any, Any, Any], what: str) -> Any:
        with self._lock:
            loop = self._ensure_loop()
            future = asyncio.run_coroutine_threadsafe(coro, loop)
            # openenv bounds connect and each receive; this outer bound is the backstop.
            deadline = self.connect_timeout_s + self.message_timeout_s + 5.0
            try:
                return future.result(timeout=deadline)
            except (concurrent.futures.TimeoutError, asyncio.TimeoutError, TimeoutError) as e:
                future.cancel()
                self._drop_connection()
                raise EnvTimeoutError(
                    f"{what} on {self._ws_url}: no answer within {self.message_timeout_s:.0f} s "
                    "(server hung or overloaded); the session is lost"
                ) from e
            except RuntimeError as e:
                if str(e).startswith("Server error:"):
                    # The server is alive; after these codes it has also closed the session.
                    if any(code in str(e) for code in ("CAPACITY_REACHED", "SESSION_ERROR", "FACTORY_ERROR")):
                        self._drop_connection()
                    raise EnvServerError(f"{what} on {self._ws_url}: {e}") from e
                self._drop_connection()
                raise EnvConnectionError(f"{what} on {self._ws_url}: {type(e).__name__}: {e}") from e
            except Exception as e:  # ConnectionClosed, OSError, ConnectionError, invalid frames
                self._drop_connection()
                raise EnvConnectionError(
                    f"{what} on {self._ws_url} failed: {type(e).__name__}: {e} (server died or closed the session)"
                ) from e

    def _drop_connection(self) -> None:
        # After a timeout a late answer could still arrive and be read as the next reply: never
        # reuse the socket.
        ws, self._ws = self._ws, None
        if ws is not None and self._loop is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(ws.close(), self._loop).result(timeout=2.0)
            except Exception:
                pass
