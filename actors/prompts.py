"""Observation -> chat request, with the seed gist's defaults.

System prompt: what the agent is and the commands it may use. User prompt per step: step number,
goal, URL, the last few history lines, the last action's error, the clickable element ids with
their boxes, and "reply with exactly one action". Vision-language models also get the screenshot
as an image part; text-only models can get the accessibility tree as text instead.
"""

from __future__ import annotations

import base64
from typing import Any, Sequence

from actors.config import PromptConfig
from actors.engine import ChatRequest

# One line per command, shown to the model. Signatures follow BrowserGym's high-level action set.
COMMAND_HELP: dict[str, str] = {
    "noop": "noop() - do nothing (wait)",
    "click": "click('bid') - click the element with that id",
    "dblclick": "dblclick('bid') - double-click the element",
    "hover": "hover('bid') - move the mouse over the element",
    "fill": "fill('bid', 'text') - type text into an input field",
    "clear": "clear('bid') - clear an input field",
    "select_option": "select_option('bid', 'option') - choose an option of a select element",
    "press": "press('bid', 'Enter') - press a key combination on the element",
    "focus": "focus('bid') - focus the element",
    "scroll": "scroll(0, 200) - scroll by (dx, dy) pixels",
    "go_back": "go_back() - navigate back",
    "go_forward": "go_forward() - navigate forward",
    "goto": "goto('url') - open a URL",
    "send_msg_to_user": "send_msg_to_user('text') - answer the user",
    "keyboard_press": "keyboard_press('Enter') - press a key",
    "keyboard_type": "keyboard_type('text') - type text",
    "mouse_click": "mouse_click(x, y) - click at page coordinates",
}


def system_prompt(allowed_actions: Sequence[str]) -> str:
    """The default system prompt: the role, the allowed commands, the answer format."""
    lines = [
        "You control a web browser to complete a task on a web page.",
        "Elements are identified by the id (bid) shown in brackets, e.g. [13].",
        "Available commands:",
    ]
    for name in allowed_actions:
        lines.append("- " + COMMAND_HELP.get(name, f"{name}(...)"))
    lines.append("Reply with exactly one command and nothing else, e.g. click('13').")
    return "\n".join(lines)


def _field(obs: Any, name: str, default: Any = None) -> Any:
    """Reads an observation field from a pydantic model, a dataclass or a dict."""
    if isinstance(obs, dict):
        return obs.get(name, default)
    return getattr(obs, name, default)


def action_error(obs: Any) -> str:
    """The last action's error message ('' if none). Our env (and upstream OpenEnv) sends the text
    in `error` and a flag in `last_action_error`; older shapes sent the text in `last_action_error`."""
    err = _field(obs, "error", "")
    if isinstance(err, str) and err.strip():
        return err.strip()
    flag = _field(obs, "last_action_error", "")
    if isinstance(flag, str):
        return flag.strip()
    return "action failed (no message)" if flag is True else ""


def screenshot_png(obs: Any) -> bytes | None:
    """The observation's screenshot as PNG bytes (it travels base64-encoded), or None."""
    b64 = _field(obs, "screenshot_png_b64")
    if not b64:
        return None
    try:
        return base64.b64decode(b64, validate=False)
    except (ValueError, TypeError):
        return None


def format_clickable(elements: Sequence[Any] | None, limit: int) -> list[str]:
    """`[bid] role 'text' @(x,y,w,h)` lines for the clickable elements, at most `limit`."""
    lines = []
    for el in list(elements or [])[:limit]:
        bid = _field(el, "bid", "?")
        role = _field(el, "role") or _field(el, "tag") or ""
        text = str(_field(el, "text", "") or "").strip().replace("\n", " ")[:60]
        bbox = _field(el, "bbox")
        box = ""
        if bbox and len(bbox) == 4:
            try:
                box = " @(" + ",".join(str(int(round(float(v)))) for v in bbox) + ")"
            except (TypeError, ValueError):
                box = ""
        label = f" '{text}'" if text else ""
        lines.append(f"[{bid}] {role}{label}{box}".rstrip())
    return lines


def user_prompt(obs: Any, step: int, history: Sequence[str], cfg: PromptConfig) -> str:
    """The per-step user text (the screenshot, if any, goes alongside as an image part)."""
    goal = str(_field(obs, "goal", "") or "")[: cfg.max_goal_chars]
    parts = [
        f"Step {step + 1}.",
        f"Goal: {goal}",
        f"URL: {_field(obs, 'url', '') or ''}",
    ]
    recent = list(history)[-cfg.history_lines :] if cfg.history_lines else []
    parts.append("History:\n" + ("\n".join(recent) if recent else "(none)"))
    error = action_error(obs)
    if error:
        parts.append(f"Last action error: {error[:300]}")
    clickable = format_clickable(_field(obs, "clickable_elements"), cfg.max_clickable_elements)
    if clickable:
        parts.append("Clickable elements (id, role, text, box x,y,w,h):\n" + "\n".join(clickable))
    if cfg.include_axtree:
        axtree = str(_field(obs, "axtree_txt", "") or "")[: cfg.max_axtree_chars]
        if axtree:
            parts.append("Accessibility tree:\n" + axtree)
    parts.append("Reply with exactly one action.")
    return "\n".join(parts)


def build_request(
    obs: Any,
    step: int,
    history: Sequence[str],
    cfg: PromptConfig,
    allowed_actions: Sequence[str],
) -> ChatRequest:
    """The chat request for one step: system + user message, the screenshot as an image part."""
    system = cfg.system_prompt if cfg.system_prompt is not None else system_prompt(allowed_actions)
    text = user_prompt(obs, step, history, cfg)
    images: list[bytes] = []
    png = screenshot_png(obs) if cfg.include_screenshot else None
    if png is not None:
        images.append(png)
        content: Any = [{"type": "image"}, {"type": "text", "text": text}]
    else:
        content = text
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": content},
    ]
    return ChatRequest(messages=messages, images=images)


def history_line(step: int, action: str, reward: float, error: str) -> str:
    """One history entry: what was done and what came of it."""
    line = f"step {step + 1}: {action} -> reward {reward:g}"
    if error:
        line += f" (error: {error.strip()[:120]})"
    return line
