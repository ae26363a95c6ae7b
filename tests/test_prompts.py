"""Prompts, rewards and the rollout config: pure functions, no browser."""

import base64
import io

import pytest
from PIL import Image

from actors.config import PromptConfig, RolloutConfig
from actors.prompts import build_request, history_line, system_prompt
from actors.rewards import aggregate, episode_return
from core.trajectory import Step


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


OBS = {
    "goal": "Click the button labelled OK.",
    "url": "file:///miniwob/click-test.html",
    "error": "ValueError: element 99 not found",
    "last_action_error": True,
    "screenshot_png_b64": base64.b64encode(_png()).decode(),
    "axtree_txt": "[13] button 'OK'",
    "clickable_elements": [
        {"bid": "13", "role": "button", "text": "OK", "bbox": [10.2, 20.0, 40, 16.7]},
        {"bid": "14", "tag": "a", "text": "", "bbox": None},
    ],
}


def test_system_prompt_lists_commands():
    text = system_prompt(["noop", "click", "fill"])
    assert "click('bid')" in text and "fill('bid', 'text')" in text and "noop()" in text
    assert "exactly one" in text


def test_user_prompt_has_the_gist_fields_and_screenshot_part():
    history = [history_line(i, f"click('{i}')", 0.0, "") for i in range(6)]
    req = build_request(OBS, 6, history, PromptConfig(), ["noop", "click"])
    assert [m["role"] for m in req.messages] == ["system", "user"]
    content = req.messages[1]["content"]
    assert content[0] == {"type": "image"} and content[1]["type"] == "text"
    text = content[1]["text"]
    assert "Step 7." in text and "Goal: Click the button labelled OK." in text
    assert "URL: file:///miniwob/click-test.html" in text
    # the last 4 history lines only
    assert "click('1')" not in text and all(f"click('{i}')" in text for i in range(2, 6))
    assert "Last action error: ValueError: element 99 not found" in text
    assert "[13] button 'OK' @(10,20,40,17)" in text and "[14] a" in text
    assert text.rstrip().endswith("Reply with exactly one action.")
    assert "Accessibility tree" not in text
    assert req.images == [_png()]


def test_text_only_prompt_with_axtree():
    cfg = PromptConfig(include_screenshot=False, include_axtree=True)
    req = build_request(OBS, 0, [], cfg, ["click"])
    assert isinstance(req.messages[1]["content"], str) and req.images == []
    assert "Accessibility tree:\n[13] button 'OK'" in req.messages[1]["content"]


def test_rewards_aggregation_and_penalties():
    steps = [Step(index=i, prompt_ids=[1], completion_ids=[], logprobs=[], policy_version=0,
                  reward=r, parse_fallback=(i == 0)) for i, r in enumerate([0.0, 0.0, 1.0])]
    assert episode_return(steps) == 1.0
    assert episode_return(steps, "mean") == pytest.approx(1 / 3)
    assert episode_return(steps, "max") == 1.0
    assert episode_return(steps, "sum", invalid_action_penalty=0.5, step_penalty=0.1) == pytest.approx(0.2)
    assert aggregate([], "mean") == 0.0
    with pytest.raises(ValueError, match="sum, mean or max"):
        aggregate([1.0], "median")


@pytest.mark.parametrize("field, value, message", [
    ("num_sessions", 0, "num_sessions"),
    ("reward_aggregation", "median", "reward_aggregation"),
    ("on_failure", "retry", "on_failure"),
    ("step_timeout_s", 0, "step_timeout_s"),
    ("invalid_action_penalty", -1.0, "penalties"),
])
def test_rollout_config_validation(field, value, message):
    cfg = RolloutConfig()
    cfg.validate()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
