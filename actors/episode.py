"""The multi-step episode loop and the batcher that lets one engine serve many episodes.

`run_episode` is one episode read top to bottom: reset -> (prompt -> engine -> parse -> env step)
up to `max_steps`. It never raises for an env or engine failure: the episode comes back with status
FAILED and a reason, so the caller can replace the env server and count it (a failed episode is
never scored and never trained on).

`GenerationBatcher` is continuous batching over a worker's episodes: whenever the engine is free,
every prompt waiting at that moment goes into the next engine call. It never waits for an episode
that is still resetting or stepping its browser, so a slow browser does not hold the others back.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from actors.action_parser import ActionParser
from actors.config import RolloutConfig
from actors.engine import ChatRequest, Generation, InferenceEngine, SamplingSettings
from actors.prompts import action_error, build_request, history_line
from actors.rewards import episode_return
from core.trajectory import FAILED, FINISHED, TRUNCATED, Step, Trajectory

log = logging.getLogger(__name__)

# Failure reasons start with one of these kinds, so the worker knows what to repair.
ENV_ERROR = "env_error"  # the env server died, refused or broke the connection
ENV_TIMEOUT = "env_timeout"  # a reset/step exceeded its timeout: the server is presumed hung
ENGINE_ERROR = "engine_error"
EPISODE_TIMEOUT = "episode_timeout"


class EnvSession(Protocol):
    """One env session (one browser) as the episode loop uses it."""

    def reset(self, task: str, seed: int) -> Any:
        """Starts an episode; returns the first observation."""

    def step(self, action: str) -> tuple[Any, float, bool]:
        """Sends one action string; returns (observation, reward, done)."""


class EnvTimeout(TimeoutError):
    """An env call exceeded its time limit (raised by session adapters that detect it)."""


def is_env_failure(trajectory: Trajectory) -> bool:
    """True when the episode failed because of its env session (the session needs replacing)."""
    return trajectory.status == FAILED and trajectory.failure_reason.startswith((ENV_ERROR, ENV_TIMEOUT))


def _obs_field(obs: Any, name: str, default: Any = None) -> Any:
    if isinstance(obs, dict):
        return obs.get(name, default)
    return getattr(obs, name, default)


def run_episode(
    env: EnvSession,
    generate: Callable[[ChatRequest], Generation],
    *,
    task: str,
    seed: int,
    episode_id: str,
    group_id: str,
    config: RolloutConfig,
    parser: ActionParser,
    worker_id: str = "",
    is_timeout: Callable[[BaseException], bool] = lambda e: isinstance(e, TimeoutError),
) -> Trajectory:
    """Runs one episode; returns it as finished, truncated or failed (with reason). Never raises
    for env or engine failures (it does for programming errors such as a bad config)."""
    started = time.monotonic()
    deadline = started + config.episode_timeout_s
    traj = Trajectory(episode_id=episode_id, group_id=group_id, task=task, seed=seed, worker_id=worker_id)
    try:
        # --- reset -----------------------------------------------------------------------
        obs = _env_call(lambda: env.reset(task=task, seed=seed), "reset", 0, is_timeout)
        traj.goal = str(_obs_field(obs, "goal", "") or "")
        history: list[str] = []
        done = bool(_obs_field(obs, "done", False))

        # --- steps -----------------------------------------------------------------------
        for index in range(config.max_steps):
            if done:
                break
            if time.monotonic() > deadline:
                raise _Failure(EPISODE_TIMEOUT, f"over {config.episode_timeout_s:g}s after {index} steps")

            request = build_request(obs, index, history, config.prompt, config.allowed_actions)
            t0 = time.monotonic()
            try:
                gen = generate(request)
            except Exception as exc:  # noqa: BLE001
                raise _Failure(ENGINE_ERROR, f"step {index}: {type(exc).__name__}: {exc}") from exc
            engine_s = time.monotonic() - t0

            parsed = parser.parse(gen.text)
            t0 = time.monotonic()
            obs, reward, done = _env_call(lambda: env.step(parsed.action), "step", index, is_timeout)
            env_s = time.monotonic() - t0

            error = action_error(obs)
            reward = float(reward or 0.0)
            done = bool(done)
            traj.steps.append(_step(index, request, gen, parsed, reward, done, error, engine_s, env_s))
            history.append(history_line(index, parsed.action, reward, error))
    except _Failure as failure:
        return _failed(traj, started, failure.kind, failure.detail)

    # --- outcome ---------------------------------------------------------------------------
    traj.status = FINISHED if done else TRUNCATED
    traj.episode_return = episode_return(
        traj.steps, config.reward_aggregation, config.invalid_action_penalty, config.step_penalty
    )
    traj.wall_s = time.monotonic() - started
    return traj


class _Failure(Exception):
    """An env or engine failure inside `run_episode`, turned into a FAILED trajectory there."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def _env_call(call: Callable[[], Any], op: str, index: int,
              is_timeout: Callable[[BaseException], bool]) -> Any:
    """`call()`, with any env failure as an `_Failure` of kind ENV_TIMEOUT or ENV_ERROR (the
    worker replaces a timed-out server, presumed hung)."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - any env failure is recorded, not raised
        kind = ENV_TIMEOUT if is_timeout(exc) else ENV_ERROR
        raise _Failure(kind, f"{op} at step {index}: {type(exc).__name__}: {exc}") from exc


def _failed(traj: Trajectory, started: float, kind: str, detail: str) -> Trajectory:
    """`traj` marked FAILED with reason "kind: detail" (the worker repairs by the kind)."""
    traj.status = FAILED
    traj.failure_reason = f"{kind}: {detail}"[:2000]
    traj.episode_return = None  # no outcome of the policy: stored as null, never as a reward of 0
    traj.wall_s = time.monotonic() - started
    log.warning("episode %s (%s seed %s) failed: %s", traj.episode_id, traj.task, traj.seed,
                traj.failure_reason)
    return traj


def _step(
    index: int, request: ChatRequest, gen: Generation, parsed: Any, reward: float, done: bool,
    error: str, engine_s: float, env_s: float,
) -> Step:
    """One recorded step: the engine's exact ids and logprobs (what the learner re-scores), the
    prompt's images, the parsed action and what the env answered."""
    return Step(
        index=index,
        prompt_ids=list(gen.prompt_ids),
        completion_ids=list(gen.completion_ids),
        logprobs=[float(x) for x in gen.logprobs],
        policy_version=int(gen.policy_version),
        token_versions=[int(v) for v in gen.token_versions],
        images=list(request.images),
        completion_text=gen.text,
        action=parsed.action,
        parse_fallback=parsed.fallback,
        reward=reward,
        done=done,
        action_error=error[:2000],
        finish_reason=gen.finish_reason,
        engine_s=engine_s,
        env_s=env_s,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
    )


@dataclass
class BatcherStats:
    """What the engine did for the worker (for benchmarks: where the time goes)."""

    calls: int = 0
    requests: int = 0
    busy_s: float = 0.0
    max_batch: int = 0


class GenerationBatcher:
    """Continuous batching of concurrent episodes' prompts into `engine.generate` calls, on one thread.

    Episodes call `generate(request)` (blocking). As soon as a prompt is waiting, the batcher takes
    the engine (`engine_lock`; weight updates hold it too) and then sends every prompt waiting at
    that moment as one call. Prompts that arrive while the engine is busy go into the next call.
    Invariant: the batcher never waits for an episode that is not waiting for the engine (one still
    resetting or stepping its browser), and when all K episodes are waiting they share one call.
    """

    def __init__(self, engine: InferenceEngine, sampling: SamplingSettings, timeout_s: float,
                 engine_lock: threading.Lock | None = None) -> None:
        self.engine = engine
        self.sampling = sampling
        self.timeout_s = timeout_s
        # Shared with update_weights so new weights never land in the middle of a batch.
        self.engine_lock = engine_lock or threading.Lock()
        self.stats = BatcherStats()
        self._cv = threading.Condition()
        self._pending: list[tuple[ChatRequest, Future]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="generation-batcher", daemon=True)
        self._thread.start()

    def waiting(self) -> int:
        """How many prompts are queued for the next engine call (not yet taken into one)."""
        with self._cv:
            return len(self._pending)

    def generate(self, request: ChatRequest) -> Generation:
        """Blocks until the batch holding `request` is generated; raises on engine error/timeout."""
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("generation batcher is closed")
            self._pending.append((request, future))
            self._cv.notify_all()
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"engine did not answer within {self.timeout_s:g}s") from None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cv.notify_all()
        for _, fut in pending:
            fut.set_exception(RuntimeError("generation batcher closed"))
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
            # Take the engine first, then the batch: prompts that arrived while the engine was
            # busy (a previous call, a weight update) all go into this call.
            with self.engine_lock:
                with self._cv:
                    batch, self._pending = self._pending, []
                if not batch:  # close() took them
                    continue
                try:
                    results: list[Generation | BaseException] = list(self._generate(batch))
                except Exception:  # noqa: BLE001
                    # One bad request (e.g. a prompt over the context) must not fail the others:
                    # retry them one by one, so only the culprit's episode gets the error.
                    results = []
                    for item in batch:
                        try:
                            results.append(self._generate([item])[0])
                        except Exception as exc:  # noqa: BLE001 - handed to the waiting episode
                            results.append(exc)
            for (_, fut), result in zip(batch, results):
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def _generate(self, batch: list[tuple[ChatRequest, Future]]) -> list[Generation]:
        """One engine call; the caller holds `engine_lock`."""
        t0 = time.monotonic()
        try:
            gens = self.engine.generate([r for r, _ in batch], self.sampling)
        finally:
            self.stats.calls += 1
            self.stats.requests += len(batch)
            self.stats.busy_s += time.monotonic() - t0
            self.stats.max_batch = max(self.stats.max_batch, len(batch))
        if len(gens) != len(batch):
            raise RuntimeError(f"engine returned {len(gens)} generations for {len(batch)} requests")
        return gens
