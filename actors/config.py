"""Configuration of the rollout side: how episodes are run, prompted, parsed, scored and retried."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.action_parser import DEFAULT_ACTIONS
from actors.engine import SamplingSettings

REWARD_AGGREGATIONS = ("sum", "mean", "max")
ON_FAILURE = ("rerun", "drop")


@dataclass
class PromptConfig:
    """What the model sees at each step."""

    include_screenshot: bool = True
    """Attach the screenshot as an image part (vision-language models). Off for text-only models."""
    include_axtree: bool = False
    """Add the accessibility tree as text (the option for text-only models)."""
    max_axtree_chars: int = 4000
    """The accessibility tree is cut to this many characters (prompt length stays bounded)."""
    history_lines: int = 4
    """How many of the last actions (with their reward/error) the user prompt repeats."""
    max_clickable_elements: int = 40
    """At most this many clickable element ids (with boxes) are listed."""
    max_goal_chars: int = 1000
    """The goal text is cut to this many characters."""
    system_prompt: str | None = None
    """Replaces the default system prompt (which lists the allowed commands) when set."""

    def validate(self) -> None:
        for name in ("max_axtree_chars", "history_lines", "max_clickable_elements", "max_goal_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"prompt.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RolloutConfig:
    """One rollout worker: K env sessions, one engine, GRPO groups of multi-step episodes."""

    num_sessions: int = 2
    """K: env sessions (browsers) this worker drives concurrently; one embedded server each."""
    max_steps: int = 8
    """An episode stops (status truncated) after this many steps if the env has not said done."""
    step_timeout_s: float = 60.0
    """Limit for one env reset or step over the WebSocket; past it the server is presumed hung."""
    engine_timeout_s: float = 300.0
    """Limit for one engine call as seen by an episode (queueing for the batch included)."""
    episode_timeout_s: float = 600.0
    """Limit for one whole episode; past it the episode is marked failed (never scored)."""
    connect_timeout_s: float = 30.0
    """Limit for opening the WebSocket session to an env server."""
    reward_aggregation: str = "sum"
    """Episode return from step rewards: "sum" (the gist's), "mean" or "max"."""
    invalid_action_penalty: float = 0.0
    """Subtracted from a step's reward when the parser fell back or the env reported an action
    error (0 = off)."""
    step_penalty: float = 0.0
    """Subtracted from every step's reward (a step cost; 0 = off)."""
    on_failure: str = "rerun"
    """A group with a failed episode (env died/hung, timeout) is "rerun" or "drop"ped."""
    max_group_reruns: int = 1
    """How many times one group may be re-run before it is dropped."""
    env_restart_budget: int = 10
    """Env servers this worker may restart (dead or hung; an env-server host actor recreated
    counts once) or fail over from (remote servers) within env_restart_window_s; one more ends
    the run with an error naming the server and its last failure."""
    env_restart_window_s: float = 3600.0
    """The sliding time window, in seconds, over which env_restart_budget counts."""
    env_restart_timeout_s: float = 300.0
    """Longest a worker waits for an env-server host actor that died to be back (Ray restarts it,
    on another node if its node is gone); past it the repair counts as failed."""
    allowed_actions: list[str] = field(default_factory=lambda: list(DEFAULT_ACTIONS))
    """Action names the parser accepts and the system prompt lists (BrowserGym high-level action
    names; keep them inside the env's `action_subsets`)."""
    max_action_chars: int = 512
    """A parsed action longer than this is rejected (fallback)."""
    fallback_action: str = "noop(0)"
    """Sent when the completion holds no valid action; the step records that it was used. The
    seed gist's `noop()`, but with BrowserGym's wait set to 0 ms: its default waits 1 s (a
    fallback step of the local preset took 1.2 s of env time, other steps 0.3-0.5 s in
    bench_rollout), and an unparseable completion is no reason to wait."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt construction options."""
    sampling: SamplingSettings = field(
        default_factory=lambda: SamplingSettings(temperature=0.5, top_k=10, max_new_tokens=16)
    )
    """Sampling settings for every engine call (the gist's: temperature 0.5, top_k 10, 16 tokens)."""
    write_parquet: bool = True
    """Append every group to `<run_dir>/trajectories/` as Parquet."""
    write_viewer: bool = True
    """Write a self-contained HTML page per group into `<run_dir>/viewer/`."""

    def validate(self) -> None:
        if self.num_sessions < 1:
            raise ValueError(f"rollout.num_sessions must be >= 1, got {self.num_sessions}")
        if self.max_steps < 1:
            raise ValueError(f"rollout.max_steps must be >= 1, got {self.max_steps}")
        for name in ("step_timeout_s", "engine_timeout_s", "episode_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rollout.{name} must be > 0, got {getattr(self, name)}")
        if self.reward_aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(
                f"rollout.reward_aggregation must be one of {REWARD_AGGREGATIONS}, "
                f"got {self.reward_aggregation!r}"
            )
        if self.invalid_action_penalty < 0 or self.step_penalty < 0:
            raise ValueError("rollout penalties are amounts to subtract and must be >= 0")
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"rollout.on_failure must be one of {ON_FAILURE}, got {self.on_failure!r}")
        if self.max_group_reruns < 0:
            raise ValueError(f"rollout.max_group_reruns must be >= 0, got {self.max_group_reruns}")
        if self.env_restart_budget < 0:
            raise ValueError(f"rollout.env_restart_budget must be >= 0, got {self.env_restart_budget}")
        if not (self.env_restart_window_s > 0 and self.env_restart_timeout_s > 0):
            raise ValueError("rollout.env_restart_window_s and rollout.env_restart_timeout_s must be > 0")
        if "noop" not in self.allowed_actions and self.fallback_action.startswith("noop"):
            raise ValueError("rollout.allowed_actions must include 'noop' when the fallback is noop()")
        self.prompt.validate()
        self.sampling.validate()
