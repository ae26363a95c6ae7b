"""`recorded.click-button`: a browser-free OpenEnv environment for machines without Chromium.

Why it exists: GPU machines often have no browser (the project's device machine has none), yet
the whole training path (driver, env servers, WebSocket clients, rollout workers, vLLM, learner,
NCCL weight sync) should run there end to end. This environment serves one recorded MiniWoB
click-button page (a real screenshot taken with BrowserGym, plus its clickable elements) through
the same server, wire format and client as BrowserGym, so nothing else changes.

The task: the goal names one of the page's three buttons, chosen by the seed. `click('<bid>')` on
the named button ends the episode with reward 1.0, on another button with reward 0.0 (as
MiniWoB's click-button scores a wrong click); any other action of BrowserGym's grammar is a
no-op on this static page, and text that is not an action is recorded as an action error. The
screenshot never changes (it is the recorded one, whose goal bar was blank); the goal and the
element list are what tell the buttons apart. It is a smoke-test environment, not a benchmark.
"""

from __future__ import annotations

import ast
import base64
import random
import uuid
from pathlib import Path
from typing import Any, Optional

from openenv.core.env_server.interfaces import Environment

from envs.browsergym.config import EnvConfig, qualify_task_name, reset_seed
from envs.browsergym.models import BrowserGymAction, BrowserGymObservation, BrowserGymState

BENCHMARK = "recorded"
TASKS = ("recorded.click-button",)
URL = "recorded://miniwob/click-button.html"
SCREENSHOT = Path(__file__).with_name("click-button.png")

# The recorded page's buttons; bboxes in CSS px of MiniWoB's 332x214 viewport (the screenshot is
# 498x321 device px, i.e. 1.5x).
BUTTONS = (
    {"bid": "13", "role": "button", "tag": "button", "text": "no", "bbox": [2, 63, 31, 20]},
    {"bid": "14", "role": "button", "tag": "button", "text": "Ok", "bbox": [2, 85, 33, 20]},
    {"bid": "15", "role": "button", "tag": "button", "text": "submit", "bbox": [2, 105, 55, 20]},
)
AXTREE = "\n".join(f"[{b['bid']}] button '{b['text']}'" for b in BUTTONS)
PRUNED_HTML = "".join(f'<button bid="{b["bid"]}">{b["text"]}</button>' for b in BUTTONS)
# BrowserGym's high-level action names; any other name is an action error, as it is there.
ACTION_NAMES = frozenset({
    "noop", "click", "dblclick", "fill", "clear", "hover", "focus", "press", "select_option",
    "scroll", "drag_and_drop", "keyboard_press", "keyboard_type", "keyboard_down", "keyboard_up",
    "keyboard_insert_text", "mouse_click", "mouse_dblclick", "mouse_move", "mouse_down", "mouse_up",
    "mouse_drag_and_drop", "send_msg_to_user", "report_infeasible",
})


def is_recorded_task(task: str) -> bool:
    return qualify_task_name(task).split(".", 1)[0] == BENCHMARK


def parse_call(action: str) -> tuple[str, list[Any]]:
    """`click('13')` -> ('click', ['13']). Raises ValueError unless `action` is exactly one call
    with literal arguments (nothing is evaluated: the tree is only inspected)."""
    try:
        tree = ast.parse(action.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an action call: {e.msg}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ValueError("expected one call such as click('13')")
    try:
        args = [ast.literal_eval(a) for a in call.args]
    except ValueError:
        raise ValueError("action arguments must be literals") from None
    if call.keywords:
        raise ValueError("keyword arguments are not accepted")
    return call.func.id, args


class RecordedEnvironment(Environment[BrowserGymAction, BrowserGymObservation, BrowserGymState]):
    """The recorded click-button page behind OpenEnv's reset/step/state (no browser)."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, config: Optional[EnvConfig] = None):
        super().__init__()
        self.config = (config or EnvConfig(task=TASKS[0])).validate()
        self._png_b64 = base64.b64encode(SCREENSHOT.read_bytes()).decode("ascii")
        self._target: dict[str, Any] | None = None
        self._done = True
        self._state = BrowserGymState(max_steps=self.config.max_steps)

    def reset(
        self,
        seed: Optional[int] = None,
        episode_id: Optional[str] = None,
        task: Optional[str] = None,
        task_name: Optional[str] = None,
        **kwargs: Any,
    ) -> BrowserGymObservation:
        seed = reset_seed(seed, kwargs)
        qualified = qualify_task_name(task or task_name or self.config.task)
        if qualified not in TASKS:
            raise ValueError(f"unknown task {qualified!r}: this server replays {', '.join(TASKS)} only "
                             "(BrowserGym tasks need a server started with a BrowserGym task)")
        self._target = BUTTONS[random.Random(seed).randrange(len(BUTTONS))]
        self._done = False
        self._state = BrowserGymState(
            episode_id=episode_id or str(uuid.uuid4()), step_count=0, benchmark=BENCHMARK,
            task_name=qualified, goal=f'Click on the "{self._target["text"]}" button.', current_url=URL,
            max_steps=self.config.max_steps, cum_reward=0.0, seed=seed, done=False,
        )
        return self._observation(reward=0.0, terminated=False, truncated=False)

    def step(self, action: BrowserGymAction, timeout_s: Optional[float] = None, **kwargs: Any) -> BrowserGymObservation:
        if self._target is None or self._done:
            reason = "call reset() before step()" if self._target is None else "episode is over; call reset()"
            return self._observation(0.0, False, False, error=reason, done=self._target is not None)
        text = action.action_str
        error, reward, terminated = "", 0.0, False
        if len(text) > self.config.max_action_chars:
            error = f"action longer than {self.config.max_action_chars} characters"
        else:
            try:
                name, args = parse_call(text)
            except ValueError as e:
                name, args, error = "", [], str(e)
            if name and name not in ACTION_NAMES:
                error = f"unknown action {name!r}"
            elif name == "click":
                bid = str(args[0]) if args else ""
                button = next((b for b in BUTTONS if b["bid"] == bid), None)
                if button is None:
                    error = f"no element with bid {bid!r} on this page"
                else:
                    terminated, reward = True, 1.0 if button is self._target else 0.0
        self._state.step_count += 1
        truncated = not terminated and self._state.step_count >= self.config.max_steps
        self._done = terminated or truncated
        self._state.cum_reward += reward
        self._state.done = self._done
        return self._observation(reward, terminated, truncated, error=error, last_action=text[:200])

    @property
    def state(self) -> BrowserGymState:
        return self._state

    def close(self) -> None:
        self._target, self._done = None, True

    def _observation(self, reward: float, terminated: bool, truncated: bool, error: str = "",
                     last_action: str = "", done: bool | None = None) -> BrowserGymObservation:
        s = self._state
        return BrowserGymObservation(
            text=AXTREE, url=URL, goal=s.goal, axtree_txt=AXTREE,
            pruned_html=PRUNED_HTML if self.config.include_pruned_html else "",
            error=error, last_action_error=bool(error),
            done=(terminated or truncated) if done is None else done, reward=reward,
            screenshot_png_b64=self._png_b64 if self.config.include_screenshot else "",
            clickable_elements=[dict(b) for b in BUTTONS], step_count=s.step_count,
            task_name=s.task_name, seed=s.seed, terminated=terminated, truncated=truncated,
            last_action=last_action,
        )
