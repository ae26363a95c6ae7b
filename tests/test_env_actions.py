"""Action checking, config validation and Chromium discovery: no browser needed."""

from __future__ import annotations

import os
import stat

import pytest

from envs.browsergym.actions import ActionValidator, InvalidActionError
from envs.browsergym.chromium import ChromiumNotFoundError, find_chromium
from envs.browsergym.config import EnvConfig, qualify_task_name


def hostile_actions(canary: str) -> list[str]:
    """Malformed or malicious action strings; none may run code or touch `canary`."""
    return [
        f"__import__('os').system('touch {canary}')",
        f"exec(\"open('{canary}', 'w').close()\")",
        f"eval(\"__import__('os').system('touch {canary}')\")",
        f"click('12'); __import__('os').system('touch {canary}')",
        f"click('12')\nimport os\nos.system('touch {canary}')",
        f"fill('12', open('{canary}', 'w'))",
        f"click(__import__('os').system('touch {canary}'))",
        f"fill('12', '{canary}'.__class__)",
        f"page.evaluate(\"require('fs').writeFileSync('{canary}', '')\")",
        "click('12') click('13')",  # several calls
        "click('12')\nfill('13', 'x')",  # several calls on lines
        "click('12",  # unbalanced quote
        "fill('12', \"abc)",  # unbalanced quote
        "click(('12'",  # unbalanced parentheses
        "teleport('12')",  # unknown function
        "goto('file:///etc/passwd')",  # navigation is not in the default subsets
        "upload_file('12', '/etc/passwd')",  # file upload is not in the default subsets
        "send_msg_to_user('hi')",  # chat is not in the default subsets
        "x" * 100_000,  # 100 KB
        "click('" + "1" * 100_000 + "')",  # 100 KB inside a valid-looking call
        b"\xff\xfe\xfaclick('12')".decode("utf-8", "surrogateescape"),  # non-UTF-8 bytes
        "",  # empty
        "   \n\t  ",  # blank
        "click\x00('12')",  # NUL
        "lambda: 0",
        "click = 1",
        "[click('12') for _ in range(10**9)]",
    ]


@pytest.fixture(scope="module")
def validator() -> ActionValidator:
    config = EnvConfig()
    return ActionValidator(config.action_subsets, config.max_action_chars, config.allow_multiaction)


def test_hostile_actions_are_rejected_with_a_clear_message(validator, tmp_path):
    canary = tmp_path / "CANARY"
    actions = hostile_actions(str(canary))
    assert len(actions) >= 20
    for action in actions:
        with pytest.raises(InvalidActionError) as excinfo:
            validator.to_python_code(action)
        message = str(excinfo.value)
        assert message and len(message) < 1000, (action[:80], message)
        message.encode("utf-8")  # the message itself must be sendable as JSON text
    assert not canary.exists()


@pytest.mark.parametrize(
    "action, call",
    [
        ("click('13')", "click('13')"),
        ('fill("14", "Kanesha")', "fill('14', 'Kanesha')"),
        ("keyboard_press('Enter')", "keyboard_press('Enter')"),
        ("mouse_click(10.5, 20)", "mouse_click(10.5, 20)"),
        ("  click('13')  # the button\n", "click('13')"),
    ],
)
def test_valid_actions_become_one_call_of_the_action_set(validator, action, call):
    code = validator.to_python_code(action)
    # The generated code ends with the re-rendered call; everything before it is BrowserGym's
    # own function definitions.
    assert code.rstrip().splitlines()[-1] == call


def test_arguments_are_rerendered_as_literals(validator):
    # A string argument that looks like code stays a string literal.
    code = validator.to_python_code("fill('14', \"'); __import__('os').system('x'); ('\")")
    assert code.rstrip().splitlines()[-1] == "fill('14', \"'); __import__('os').system('x'); ('\")"


def test_length_limit_is_configurable():
    small = ActionValidator(["miniwob_all"], max_chars=20)
    small.to_python_code("click('13')")
    with pytest.raises(InvalidActionError, match="too long"):
        small.to_python_code("fill('13', 'a long text here')")


def test_multiaction_can_be_enabled():
    multi = ActionValidator(["miniwob_all"], max_chars=200, multiaction=True)
    code = multi.to_python_code("click('12')\nclick('13')")
    assert code.rstrip().splitlines()[-2:] == ["click('12')", "click('13')"]


def test_raw_python_action_set_is_refused():
    with pytest.raises(ValueError, match="Python"):
        EnvConfig(action_subsets=["python"]).validate()
    # The project's own guard, not BrowserGym's error for an unknown subset.
    with pytest.raises(ValueError, match="^the raw-Python action set is never allowed$"):
        ActionValidator(["python"], max_chars=10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"action_subsets": []}, "action_subsets"),
        ({"action_subsets": ["bidd"]}, "unknown action subset"),
        ({"max_action_chars": 0}, "max_action_chars"),
        ({"pre_observation_delay": -1.0}, "pre_observation_delay"),
        ({"slow_mo": -5}, "slow_mo"),
        ({"viewport": {"width": 0, "height": 10}}, "viewport"),
        ({"max_sessions": 0}, "max_sessions"),
        ({"task": " "}, "task"),
    ],
)
def test_config_validate_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        EnvConfig(**overrides).validate()


def test_config_json_round_trip_and_unknown_keys():
    config = EnvConfig(task="miniwob.enter-text", max_steps=3, include_screenshot=False)
    assert EnvConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown EnvConfig keys: bogus"):
        EnvConfig.from_json('{"bogus": 1}')


def test_qualify_task_name():
    assert qualify_task_name("click-test") == "miniwob.click-test"
    assert qualify_task_name("miniwob.click-test") == "miniwob.click-test"
    assert qualify_task_name("browsergym/miniwob.click-dialog") == "miniwob.click-dialog"


def _fake_binary(path) -> str:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_chromium_discovery_order(tmp_path, monkeypatch):
    monkeypatch.delenv("BGRPO_CHROMIUM", raising=False)
    configured = _fake_binary(tmp_path / "configured")
    from_env = _fake_binary(tmp_path / "from_env")
    playwright_own = _fake_binary(tmp_path / "playwright_chrome")
    # 1. the configured path wins
    assert find_chromium(configured, playwright_own) == configured
    with pytest.raises(ChromiumNotFoundError, match="not an executable"):
        find_chromium(str(tmp_path / "missing"), playwright_own)
    # 2. then $BGRPO_CHROMIUM
    monkeypatch.setenv("BGRPO_CHROMIUM", from_env)
    assert find_chromium(None, playwright_own) == from_env
    monkeypatch.delenv("BGRPO_CHROMIUM")
    # 3. then Playwright's own download (None = let Playwright use it)
    assert find_chromium(None, playwright_own) is None
    # 4. then the system's
    system = find_chromium(None, str(tmp_path / "no_playwright_browser"))
    assert system is not None and os.access(system, os.X_OK)


# --- the exact messages (they go back to the model as its action's error) and limits ---------


def test_rejection_messages_exactly(validator):
    def message(action) -> str:
        with pytest.raises(InvalidActionError) as excinfo:
            validator.to_python_code(action)
        return str(excinfo.value)

    assert message(1.5) == "action must be a string, got float"
    assert message("click\x00('12')") == "action contains a NUL character"
    assert message("  ") == "empty action; expected one call such as click('48', button='middle', modifiers=['Shift'])"
    assert message("teleport('1')") == (
        "Invalid action type 'teleport'. Allowed functions: click, fill, keyboard_press, keyboard_type, "
        "mouse_click, mouse_dblclick, mouse_down, mouse_move, mouse_up, noop, scroll")
    assert message("click('12') click('13')") == (
        "Received a multi-action, only single-actions are allowed. (action: \"click('12') click('13')\")")
    # Untrusted text is shown cut to 60 characters and ASCII-escaped.
    assert message("x" * 61) == ("could not parse action '" + "x" * 60 + "...': expected one call like click('12') or "
                                 "fill('14', 'text') with literal arguments (ParseException at column 62)")
    assert message("x" * 60).startswith("could not parse action '" + "x" * 60 + "':")
    assert message("clické ;").startswith("could not parse action 'click\\xe9 ;': ")
    bad = b"\xffclick('12')".decode("utf-8", "surrogateescape")
    assert message(bad) == ("action is not valid Unicode text (lone surrogate / undecodable bytes): "
                            "\"\\udcffclick('12')\"")
    multi = ActionValidator(["miniwob_all"], max_chars=200, multiaction=True)
    with pytest.raises(InvalidActionError, match=r"^could not parse action 'x': expected calls like click\('12'\)"):
        multi.to_python_code("x")


def test_length_limit_is_inclusive_and_description_follows_its_options():
    exact = ActionValidator(["miniwob_all"], max_chars=11)
    assert exact.check("click('13')") == "click('13')"  # exactly 11 characters
    with pytest.raises(InvalidActionError, match=r"^action too long: 12 characters, limit 11$"):
        exact.check("click('130')")
    v = ActionValidator(["miniwob_all"], max_chars=100)
    assert v.describe() == v.action_set.describe(with_long_description=False, with_examples=True)
    assert v.describe(with_long_description=True, with_examples=False) == v.action_set.describe(
        with_long_description=True, with_examples=False)
    assert v.describe(with_examples=False) != v.describe()
    # One call per action unless multiaction is asked for.
    with pytest.raises(InvalidActionError, match="^Received a multi-action"):
        v.to_python_code("click('12')\nclick('13')")
