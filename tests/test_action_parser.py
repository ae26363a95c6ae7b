"""The action parser: model output is untrusted input (only BrowserGym's high-level action
grammar, with a length limit; anything else is a recorded error, not a crash)."""

import ast
import random
import string

import pytest

from actors.action_parser import DEFAULT_ACTIONS, ActionParser


@pytest.fixture(scope="module")
def parser():
    return ActionParser()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("click('13')", "click('13')"),
        ("Action: click('13')", "click('13')"),
        ("action:   fill('5', 'hello world')", "fill('5', 'hello world')"),
        ("```python\nclick(\"a7\")\n```", 'click("a7")'),
        ("I think I should click.\nAction: click('3') then fill('4','x')", "click('3')"),
        ("click ('3')", "click('3')"),
        ("fill('4', 'a ) tricky ( value')", "fill('4', 'a ) tricky ( value')"),
        ("fill('4', 'it\\'s')", "fill('4', 'it\\'s')"),
        ("scroll(0, -200)", "scroll(0, -200)"),
        ("mouse_click(12, 40.5)", "mouse_click(12, 40.5)"),
        ("os.system('rm -rf /'); click('2')", "click('2')"),
        ("noop()", "noop()"),
    ],
)
def test_parses_first_allowed_call(parser, text, expected):
    parsed = parser.parse(text)
    assert parsed == parsed.__class__(expected, False, "")


@pytest.mark.parametrize(
    "text, reason_part",
    [
        ("", "empty"),
        ("   \n ", "empty"),
        (None, "not text"),
        ("I do not know", "no action call"),
        ("click('3'", "unbalanced"),
        ("click('3)", "unbalanced"),
        ("__import__('os').system('touch /tmp/x')", "no allowed action"),
        ("eval('1')", "no allowed action"),
        ("click(__import__('os'))", "not plain literals"),
        ("click(x)", "not plain literals"),
        ("fill('1', " + "'" + "a" * 2000 + "')", "limit"),
    ],
)
def test_falls_back_with_reason(parser, text, reason_part):
    parsed = parser.parse(text)
    assert parsed.fallback and parsed.action == "noop()"
    assert reason_part in parsed.reason


def test_only_configured_actions():
    p = ActionParser(allowed_actions=("noop", "click", "select_option"))
    assert p.parse("fill('1', 'x')").fallback
    assert p.parse("select_option('7', ['a', 'b'])").action == "select_option('7', ['a', 'b'])"
    assert p.parse("fill('1', 'x') click('2')").action == "click('2')"


def test_bad_parser_config_is_rejected():
    with pytest.raises(ValueError, match="identifier"):
        ActionParser(allowed_actions=("click()",))
    with pytest.raises(ValueError, match="fallback_action"):
        ActionParser(allowed_actions=("click",))  # noop() fallback not allowed


def _malformed(rng: random.Random) -> str:
    names = list(DEFAULT_ACTIONS) + ["eval", "exec", "__import__", "open", "goto", "lambda"]
    pieces = [
        lambda: "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 200))),
        lambda: f"{rng.choice(names)}({rng.choice(['', chr(39), chr(34)])}{rng.randint(0, 999)}",
        lambda: f"{rng.choice(names)}('{rng.randint(0, 99)}', \"{rng.choice(['x', 'y)', '(('])}",
        lambda: " ".join(f"{rng.choice(names)}('{i}')" for i in range(rng.randint(2, 5))),
        lambda: rng.choice(["Action:", "```", "```python\n", "action =", "> "]) * rng.randint(1, 4),
        lambda: "".join(chr(rng.randint(0x80, 0x2FFFF)) for _ in range(rng.randint(1, 50))),
        lambda: "\ud800\udfff" + chr(0) + "\x1b[31m",
        lambda: "(" * rng.randint(1, 500) + ")" * rng.randint(0, 500),
        lambda: "'" * rng.randint(1, 20) + '"' * rng.randint(0, 20),
        lambda: f"{rng.choice(names)}(" + "[" * rng.randint(1, 300) + "]" * rng.randint(0, 300) + ")",
        lambda: "x" * rng.randint(10_000, 200_000) + f"click('{rng.randint(0, 9)}')",
        lambda: f"fill('{rng.randint(0, 9)}', '" + "y" * rng.randint(400, 3000) + "')",
        lambda: f"click('{rng.randint(0, 9)}', **{{'a': 1}})",
        lambda: f"click('{rng.randint(0, 9)}'.__class__)",
    ]
    return "".join(rng.choice(pieces)() for _ in range(rng.randint(1, 4)))


def test_1000_malformed_completions_never_raise(parser):
    rng = random.Random(1234)
    n_fallback = n_valid = 0
    for _ in range(1000):
        text = _malformed(rng)
        parsed = parser.parse(text)  # must not raise
        if parsed.fallback:
            n_fallback += 1
            assert parsed.action == "noop()" and parsed.reason
        else:
            n_valid += 1
            assert parsed.reason == ""
            assert len(parsed.action) <= parser.max_action_chars
            # A valid action is exactly one plain call of an allowed name with literal arguments.
            call = ast.parse(parsed.action, mode="eval").body
            assert isinstance(call, ast.Call) and call.func.id in DEFAULT_ACTIONS
            for arg in list(call.args) + [k.value for k in call.keywords]:
                ast.literal_eval(arg)
    # The generator makes both kinds; if one vanished the parser or the generator broke.
    assert n_valid > 100 and n_fallback > 100, (n_valid, n_fallback)


# --- boundaries and branches the cases above leave open (found by scripts/mutation_test.py) ---


@pytest.mark.parametrize(
    "text, expected",
    [
        ("fill('1', 'a\\\\') and more", "fill('1', 'a\\\\')"),  # an escaped backslash ends the string
        ('fill("3", "x)y")', 'fill("3", "x)y")'),  # a parenthesis inside double quotes
        ("scroll((0), 200)", "scroll((0), 200)"),  # nested parentheses
        ("fill('1', None)", "fill('1', None)"),
        ("scroll(0, delta=200)", "scroll(0, delta=200)"),  # keyword arguments with literal values
        ("foo(1) click('2')", "click('2')"),  # an unknown call first
        ("fill('1', 'abc\nclick('2')", "click('2')"),  # an unbalanced call first
        ("fill('1', x) click('2')", "click('2')"),  # a non-literal call first
        ("fill('1', '" + "y" * 600 + "') click('2')", "click('2')"),  # an over-long call first
    ],
)
def test_later_valid_call_and_literal_forms(parser, text, expected):
    parsed = parser.parse(text)
    assert (parsed.action, parsed.fallback) == (expected, False)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("fill('1', 'abc\nxyz')", "unbalanced parentheses or quotes after fill("),  # no string spans lines
        ("fill('1', b'x')", "fill(...) arguments are not plain literals"),
        ("scroll(-x, 1)", "scroll(...) arguments are not plain literals"),
        ("scroll(-'a', 1)", "scroll(...) arguments are not plain literals"),
        ("   ", "empty completion"),
        ("just words", "no action call found"),
    ],
)
def test_fallback_reasons_exactly(parser, text, reason):
    parsed = parser.parse(text)
    assert (parsed.action, parsed.fallback, parsed.reason) == ("noop()", True, reason)


def test_non_text_completion_names_its_type(parser):
    assert ActionParser(fallback_action="noop(0)").parse(123).reason == "completion is int, not text"
    assert ActionParser(fallback_action="noop(0)").parse(None).action == "noop(0)"


def test_default_limits_length_and_scan():
    p = ActionParser()
    ok = "fill('1', '" + "y" * (512 - 13) + "')"
    assert len(ok) == 512 and p.parse(ok).action == ok
    assert p.parse(ok[:-2] + "y')").reason == "fill(...) is 513 chars, over the 512 limit"
    # Only the first 8192 characters are read: a call ending at character 8193 is cut.
    assert p.parse("x " * 4091 + "click('1')").action == "click('1')"  # ends at 8192
    assert p.parse("x " * 4091 + " click('1')").reason == "unbalanced parentheses or quotes after click("


def test_parser_config_checks_exactly():
    assert ActionParser(["noop", "MyAction"]).allowed == {"noop", "MyAction"}  # any identifier
    assert ActionParser(max_action_chars=8).max_action_chars == 8
    with pytest.raises(ValueError, match="^max_action_chars must be >= 8, got 7$"):
        ActionParser(max_action_chars=7)
    with pytest.raises(ValueError, match="^allowed_actions must name at least one action$"):
        ActionParser(allowed_actions=())
    for bad in ("noop", "x.noop()", "noop(**{})"):
        with pytest.raises(ValueError, match="is not a valid allowed call$"):
            ActionParser(fallback_action=bad)
