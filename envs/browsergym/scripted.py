"""A scripted policy (the teacher) for MiniWoB tasks: reads the goal and the clickable elements (or
the accessibility tree) of an observation and returns an action string in the action parser's
format, exactly as a model would. Used by tests, the demo, the env benchmark and the demonstrations
for the supervised warm start (actors/demos.py); it proves the observation carries what an agent
needs. `noisy_action` makes the teacher imperfect on purpose (epsilon-random valid actions)."""

from __future__ import annotations

import random
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
    "miniwob.click-test-2",
    "miniwob.focus-text-2",
    "miniwob.click-checkboxes",
    "miniwob.click-option",
)
# Of these, tasks whose right action depends on the goal text (a policy must read it).
GOAL_READING_TASKS = (
    "miniwob.click-button",
    "miniwob.click-link",
    "miniwob.enter-text",
    "miniwob.focus-text-2",
    "miniwob.click-checkboxes",
    "miniwob.click-option",
)
_ORDINALS = {"1st": 0, "2nd": 1, "3rd": 2, "4th": 3, "5th": 4}


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
    if task.endswith("click-test-2"):
        return f"click('{_find(elements, text='ONE', roles=('button',))['bid']}')"
    if task.endswith("focus-text-2"):
        # "Focus into the 2nd input textbox.": the textboxes in page order.
        match = re.search(r"(\d+(?:st|nd|rd|th))", goal)
        boxes = [e for e in elements if e.get("role") in ("textbox",) or e.get("tag") == "input"]
        if not match or match.group(1) not in _ORDINALS or _ORDINALS[match.group(1)] >= len(boxes):
            raise NoScriptedAction(f"cannot read the textbox position from {goal!r}")
        return f"click('{boxes[_ORDINALS[match.group(1)]]['bid']}')"
    if task.endswith("click-checkboxes") or task.endswith("click-option"):
        # "Select A, B and click Submit." ("Select nothing" selects none): tick each named box
        # in goal order, one per step, then submit.
        match = re.match(r"Select (.*) and click Submit", goal)
        if not match:
            raise NoScriptedAction(f"cannot read the labels from {goal!r}")
        names = [] if match.group(1) == "nothing" else [n.strip() for n in match.group(1).split(",")]
        boxes = {e.get("text", "").strip(): e["bid"] for e in elements if e.get("role") in ("checkbox", "radio")}
        todo = [f"click('{boxes[n]}')" for n in names if n in boxes]
        if len(todo) != len(names):
            raise NoScriptedAction(f"labels {names} not all among {sorted(boxes)}")
        todo.append(f"click('{_find(elements, text='Submit', roles=('button',))['bid']}')")
        return todo[min(len(history), len(todo) - 1)]
    raise NoScriptedAction(f"no scripted policy for task {task!r}")


def random_valid_action(observation: BrowserGymObservation, rng: random.Random) -> str:
    """A uniformly random action that the env accepts: a click on one of the visible clickable
    elements (noop when there are none). What an imperfect teacher does on a bad day."""
    bids = [e["bid"] for e in observation.clickable_elements if e.get("bid")]
    return f"click('{rng.choice(bids)}')" if bids else "noop(0)"


def noisy_action(
    observation: BrowserGymObservation, history: tuple[str, ...], epsilon: float, rng: random.Random
) -> str:
    """The teacher's action, replaced by `random_valid_action` with probability `epsilon`."""
    if epsilon > 0 and rng.random() < epsilon:
        return random_valid_action(observation, rng)
    return scripted_action(observation, history)


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
