"""A scripted policy for a few MiniWoB tasks: reads the goal and the clickable elements of an
observation and returns an action string, exactly as a model would. Used by tests, the demo
and the env benchmark; it proves the observation carries what an agent needs."""

from __future__ import annotations

import re
from typing import Any, Optional

from envs.browsergym.models import BrowserGymObservation

# Tasks the scripted policy solves (reward 1.0 on every seed tried).
SCRIPTED_TASKS = (
    "miniwob.click-test",
    "miniwob.click-button",
    "miniwob.click-link",
    "miniwob.enter-text",
    "miniwob.focus-text",
    "miniwob.click-dialog",
)


class NoScriptedAction(LookupError):
    """The policy does not know what to do with this observation."""


def _quoted(goal: str) -> Optional[str]:
    match = re.search(r'"([^"]*)"', goal)
    return match.group(1) if match else None


def _find(elements: list[dict[str, Any]], *, text: Optional[str] = None, roles: tuple[str, ...] = ()) -> dict:
    for element in elements:
        if roles and element.get("role") not in roles and element.get("tag") not in roles:
            continue
        if text is not None and element.get("text", "").strip().lower() != text.strip().lower():
            continue
        return element
    raise NoScriptedAction(f"no element with text={text!r} roles={roles} among {elements}")


def scripted_action(observation: BrowserGymObservation, history: tuple[str, ...] = ()) -> str:
    """The next action for the observation; `history` holds this episode's earlier actions."""
    goal = observation.goal
    elements = observation.clickable_elements
    task = observation.task_name
    if task.endswith("click-test"):
        return f"click('{_find(elements, roles=('button',))['bid']}')"
    if task.endswith("click-button"):
        return f"click('{_find(elements, text=_quoted(goal), roles=('button',))['bid']}')"
    if task.endswith("click-link"):
        return f"click('{_find(elements, text=_quoted(goal))['bid']}')"
    if task.endswith("enter-text"):
        textbox = _find(elements, roles=("textbox", "input"))
        if not history:
            return f"fill('{textbox['bid']}', {_quoted(goal)!r})"
        return f"click('{_find(elements, text='Submit', roles=('button',))['bid']}')"
    if task.endswith("focus-text"):
        return f"click('{_find(elements, roles=('textbox', 'input'))['bid']}')"
    if task.endswith("click-dialog"):
        for label in ("Close", "x", "\u00d7"):
            try:
                return f"click('{_find(elements, text=label, roles=('button',))['bid']}')"
            except NoScriptedAction:
                continue
        raise NoScriptedAction(f"no close button in {elements}")
    raise NoScriptedAction(f"no scripted policy for task {task!r}")


def run_scripted_episode(
    client: Any, task: str, seed: int, max_steps: int = 5, on_reset: Any = None, on_step: Any = None
) -> tuple[float, list[str]]:
    """Play one episode of `task` through `client` (a BrowserGymEnvClient or anything with the same
    reset/step). Returns (final reward, actions taken). `on_reset(result)` sees the first
    observation, `on_step(action, result)` every step."""
    result = client.reset(seed=seed, task=task)
    if on_reset is not None:
        on_reset(result)
    actions: list[str] = []
    while not result.done and len(actions) < max_steps:
        action = scripted_action(result.observation, tuple(actions))
        actions.append(action)
        result = client.step(action)
        if on_step is not None:
            on_step(action, result)
    return float(result.reward or 0.0), actions
