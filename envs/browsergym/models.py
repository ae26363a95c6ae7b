"""OpenEnv wire types of the BrowserGym environment.

Field names follow upstream OpenEnv's `envs/browsergym_env/models.py` (`BrowserGymAction.action_str`;
observation `text, url, screenshot, goal, axtree_txt, pruned_html, error, last_action_error, done,
reward, metadata`; state `benchmark, task_name, goal, current_url, max_steps, cum_reward`), so an
upstream client can drive our server and our client can read an upstream server. What a trainer
needs beyond upstream comes as extra fields with defaults.
"""

from __future__ import annotations

from typing import Any, List, Optional

from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field


class BrowserGymAction(Action):
    """One action string in BrowserGym's high-level grammar, e.g. `click('13')`."""

    action_str: str = Field(..., description="High-level action, e.g. click('13') or fill('14', 'hello')")


class BrowserGymObservation(Observation):
    """What the agent sees after a reset or a step (plus `done`, `reward`, `metadata` from Observation)."""

    # --- upstream OpenEnv fields ---
    text: str = Field(default="", description="Text view of the page: the accessibility tree (= axtree_txt)")
    url: str = Field(default="", description="URL of the active page")
    # Kept for upstream compatibility (an upstream client reads it): nested [H][W][3] integer lists.
    # Costs ~2.4 MB and ~1 s CPU per MiniWoB step, so it is None unless the server's config sets
    # include_screenshot_array; trainers read screenshot_png_b64 instead.
    screenshot: Optional[List[List[List[int]]]] = Field(
        default=None, description="Screenshot as nested integer lists (upstream format; off by default)"
    )
    goal: str = Field(default="", description="Task goal for this episode")
    axtree_txt: str = Field(default="", description="Accessibility tree as text, lines like [13] button 'OK'")
    pruned_html: str = Field(default="", description="Pruned HTML with bid attributes")
    error: str = Field(default="", description="Error of the last action ('' if none)")
    last_action_error: bool = Field(default=False, description="Whether the last action failed")

    # --- additions for training ---
    screenshot_png_b64: str = Field(default="", description="Screenshot as base64-encoded PNG ('' if off)")
    clickable_elements: List[dict[str, Any]] = Field(
        default_factory=list,
        description="Visible clickable elements: {bid, role, tag, text, bbox: [x, y, w, h]} in CSS px",
    )
    step_count: int = Field(default=0, description="Steps taken in this episode")
    task_name: str = Field(default="", description="Task of this episode, e.g. miniwob.click-test")
    seed: Optional[int] = Field(default=None, description="Seed of this episode")
    terminated: bool = Field(default=False, description="The task ended (success or failure)")
    truncated: bool = Field(default=False, description="The episode hit max_steps")
    last_action: str = Field(default="", description="The last action string (shortened if long)")
    browser_recycled: bool = Field(
        default=False, description="This reset relaunched the session's browser (age or memory limit)"
    )


class BrowserGymState(State):
    """Episode state (plus `episode_id`, `step_count` from State)."""

    benchmark: str = Field(default="", description="Benchmark, e.g. miniwob")
    task_name: str = Field(default="", description="Task, e.g. miniwob.click-test")
    task_id: Optional[str] = Field(default=None, description="Task id for evaluation benchmarks")
    goal: str = Field(default="", description="Task goal")
    current_url: str = Field(default="", description="URL of the active page")
    max_steps: Optional[int] = Field(default=None, description="Step limit of the episode")
    cum_reward: float = Field(default=0.0, description="Reward summed over the episode")
    seed: Optional[int] = Field(default=None, description="Seed of this episode")
    done: bool = Field(default=False, description="Episode finished")
