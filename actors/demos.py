"""Demonstrations for the supervised warm start: the scripted teacher plays real MiniWoB episodes.

A demonstration step is exactly a training sample the policy could have produced: the episode runs
through the same env servers (`EnvServerPool`, the WebSocket client) and the same episode loop
(`actors.episode.run_episode`) as a rollout, the prompt is built by the same prompt builder and
rendered by the same processor as the engine renders it (prompt token ids with expanded image
tokens, the screenshot PNGs), and the target is the teacher's action text in the format the action
parser reads, tokenized, followed by the model's end-of-turn token (what the engine stops on).
The teacher takes the place of the engine: it is the `generate` callable of `run_episode`.

Teacher steps carry `policy_version = DEMO_POLICY_VERSION` (-1) and zero logprobs: they were not
sampled from any policy. Episodes are stored as the same Parquet trajectories (one group of one
episode each) and viewer pages as rollouts.

    bgrpo demos --model tiny-vlm --tasks miniwob.click-test-2 --episodes 32 --epsilon 0.5 --out DIR
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from actors.action_parser import ActionParser
from actors.config import RolloutConfig
from actors.engine import ChatRequest, Generation
from actors.episode import run_episode
from core.trajectory import FAILED, Trajectory, TrajectoryGroup, TrajectoryWriter, new_id

log = logging.getLogger(__name__)

DEMO_POLICY_VERSION = -1
"""The policy version stamped on teacher steps (no policy sampled them)."""


class DemoRenderer:
    """Prompt and target token ids exactly as the engine and the learner see them."""

    def __init__(self, model_path: str) -> None:
        from transformers import GenerationConfig

        from actors.engines.processing import load_processor, tokenizer_of

        self.processor = load_processor(model_path)
        self.tokenizer = tokenizer_of(self.processor)
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's eos, as the engine does
            eos = None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        # The first end token is what a policy should emit after the action (engines stop there).
        self.end_id = int(eos[0] if isinstance(eos, list) else eos)

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        from actors.engines.processing import render_prompt

        return list(render_prompt(self.processor, request).prompt_ids)

    def target_ids(self, action: str) -> list[int]:
        return list(self.tokenizer(action, add_special_tokens=False)["input_ids"]) + [self.end_id]


class _RecordingSession:
    """An env session that remembers the latest observation and this episode's actions, so the
    teacher can decide from what the env returned (the policy sees the same, as a prompt)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.observation: Any = None
        self.actions: list[str] = []

    def reset(self, task: str, seed: int) -> Any:
        self.actions = []
        self.observation = self.session.reset(task=task, seed=seed)
        return self.observation

    def step(self, action: str) -> tuple[Any, float, bool]:
        self.actions.append(action)
        observation, reward, done = self.session.step(action)
        self.observation = observation
        return observation, reward, done


def teacher_generate(session: _RecordingSession, renderer: DemoRenderer, epsilon: float, rng: random.Random):
    """The `generate` callable of `run_episode` with the scripted teacher in the engine's place."""
    from envs.browsergym.scripted import noisy_action

    def generate(request: ChatRequest) -> Generation:
        action = noisy_action(session.observation, tuple(session.actions), epsilon, rng)
        target = renderer.target_ids(action)
        return Generation(
            prompt_ids=renderer.prompt_ids(request),
            completion_ids=target,
            logprobs=[0.0] * len(target),
            text=action,
            finish_reason="stop",
            policy_version=DEMO_POLICY_VERSION,
        )

    return generate


@dataclass
class DemoSummary:
    """What a collection produced."""

    episodes: int = 0
    successes: int = 0
    failed: int = 0
    steps: int = 0
    wall_s: float = 0.0
    failure_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "successes": self.successes, "failed": self.failed,
                "steps": self.steps, "wall_s": round(self.wall_s, 2),
                "failure_reasons": self.failure_reasons[:10]}


def collect_demonstrations(
    model_path: str,
    instances: Sequence[tuple[str, int]],
    rollout: RolloutConfig,
    env_config: Any,
    out_dir: str | Path,
    epsilon: float = 0.0,
    num_sessions: int = 2,
    seed: int = 0,
    env_urls: Sequence[str] | None = None,
) -> tuple[list[TrajectoryGroup], DemoSummary]:
    """Plays every (task, seed) instance once with the teacher on `num_sessions` env sessions
    (embedded env servers unless `env_urls`); writes `out_dir/trajectories/*.parquet` and
    `out_dir/viewer/`. Returns the groups (one episode each, in instance order) and a summary.
    Infrastructure failures are kept (status failed, with the reason) and never trained on."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if num_sessions < 1:
        raise ValueError(f"num_sessions must be >= 1, got {num_sessions}")
    t0 = time.monotonic()
    collection = _DemoCollection(model_path, rollout, env_config, Path(out_dir), epsilon, num_sessions,
                                 seed, env_urls)
    try:
        with ThreadPoolExecutor(max_workers=num_sessions, thread_name_prefix="teacher") as executor:
            groups = list(executor.map(lambda a: collection.play(*a),
                                       [(i, t, s) for i, (t, s) in enumerate(instances)]))
    finally:
        collection.close()
    collection.summary.wall_s = time.monotonic() - t0
    return groups, collection.summary


class _DemoCollection:
    """The state of one `collect_demonstrations`: `num_sessions` env sessions (one thread each
    takes a free one per episode), the writer and the summary, shared by the teacher threads."""

    def __init__(self, model_path: str, rollout: RolloutConfig, env_config: Any, out_dir: Path,
                 epsilon: float, num_sessions: int, seed: int, env_urls: Sequence[str] | None) -> None:
        # Imported here, before any env server starts, so a broken import fails the collection
        # instead of becoming every episode's teacher_error.
        from actors.rollout_worker import ClientEnvSession, _is_timeout
        from actors.viewer import write_group_html

        self._session_type, self._is_timeout, self._write_html = ClientEnvSession, _is_timeout, write_group_html
        self.rollout, self.out_dir, self.epsilon, self.seed = rollout, out_dir, epsilon, seed
        self.renderer = DemoRenderer(model_path)
        self.parser = ActionParser(rollout.allowed_actions, rollout.max_action_chars,
                                   fallback_action=rollout.fallback_action)
        self.writer = TrajectoryWriter(out_dir / "trajectories")
        self.pool = None
        if not env_urls:
            from envs.browsergym.pool import EnvServerPool

            self.pool = EnvServerPool(num_servers=num_sessions, env_config=env_config)
            env_urls = self.pool.urls
        self.env_urls = env_urls
        self.slots: queue.Queue[int] = queue.Queue()
        for i in range(num_sessions):
            self.slots.put(i)
        self.sessions: list[Any] = [None] * num_sessions
        self.write_lock = threading.Lock()
        self.summary = DemoSummary()

    def play(self, index: int, task: str, task_seed: int) -> TrajectoryGroup:
        """Instance `index` played by the teacher on a free session, written and counted."""
        slot = self.slots.get()
        try:
            traj = self._teacher_episode(slot, index, task, task_seed)
        except Exception as exc:  # noqa: BLE001 - recorded as a failed episode, like the worker does
            traj = Trajectory(new_id(), new_id(), task, task_seed, status=FAILED, worker_id="teacher",
                              failure_reason=f"teacher_error: {type(exc).__name__}: {exc}")
            self._drop_session(slot)
        finally:
            self.slots.put(slot)
        group = TrajectoryGroup(traj.group_id, task, task_seed, [traj])
        self._record(group, traj)
        return group

    def _teacher_episode(self, slot: int, index: int, task: str, task_seed: int) -> Trajectory:
        rollout = self.rollout
        if self.sessions[slot] is None:
            self.sessions[slot] = self._session_type(self.env_urls[slot % len(self.env_urls)],
                                                   rollout.connect_timeout_s, rollout.step_timeout_s)
        recording = _RecordingSession(self.sessions[slot])
        # One RNG per episode, from the collection seed and the instance: reproducible whatever
        # the thread interleaving.
        rng = random.Random(f"{self.seed}:{index}:{task}:{task_seed}")
        group_id = new_id()
        traj = run_episode(
            recording, teacher_generate(recording, self.renderer, self.epsilon, rng), task=task,
            seed=task_seed, episode_id=new_id(), group_id=group_id, config=rollout, parser=self.parser,
            worker_id="teacher", is_timeout=self._is_timeout,
        )
        if traj.status == FAILED and self.pool is not None and traj.failure_reason.startswith("env_"):
            # The env server died or hung: a fresh server on this slot for the next episode.
            self.sessions[slot].close()
            self.sessions[slot] = None
            self.pool.restart(slot % len(self.pool.urls))
        return traj

    def _drop_session(self, slot: int) -> None:
        if self.sessions[slot] is not None:
            self.sessions[slot].close()
            self.sessions[slot] = None

    def _record(self, group: TrajectoryGroup, traj: Trajectory) -> None:
        with self.write_lock:
            self.writer.write(group)
            self._write_html(group, self.out_dir / "viewer")
            summary = self.summary
            summary.episodes += 1
            summary.steps += len(traj.steps)
            summary.successes += traj.success
            if traj.status == FAILED:
                summary.failed += 1
                summary.failure_reasons.append(traj.failure_reason[:300])

    def close(self) -> None:
        for s in self.sessions:
            if s is not None:
                s.close()
        if self.pool is not None:
            self.pool.close()


def demo_instances(tasks: Sequence[str], episodes_per_task: int, seed_range: Sequence[int], seed: int = 0) -> list[tuple[str, int]]:
    """`episodes_per_task` distinct seeds per task drawn from the half-open `seed_range` (the
    training seeds: demonstrations never touch held-out evaluation seeds), tasks interleaved."""
    lo, hi = int(seed_range[0]), int(seed_range[1])
    if hi - lo < episodes_per_task:
        raise ValueError(f"seed range {list(seed_range)} has fewer than {episodes_per_task} seeds")
    rng = random.Random(f"demos:{seed}")
    per_task = {t: rng.sample(range(lo, hi), episodes_per_task) for t in tasks}
    return [(t, per_task[t][k]) for k in range(episodes_per_task) for t in tasks]
