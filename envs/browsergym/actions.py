"""Action strings from the model are untrusted input: they pass through BrowserGym's high-level
action grammar (never its raw-Python action set) before anything runs.

`HighLevelActionSet.to_python_code` parses the string with a pyparsing grammar that accepts only
calls `name(literal, ...)` whose arguments are string/number/list/dict/bool/None literals, keeps
only functions of the chosen subsets and re-renders arguments with `repr`; the generated code is
then executed by BrowserGym. We use it in strict mode (the whole string must parse, no text
skipped around calls) and add checks before it: type, emptiness, length, encodability.
"""

from __future__ import annotations

from typing import Sequence

from browsergym.core.action.highlevel import HighLevelActionSet


class InvalidActionError(ValueError):
    """An action string that was rejected; the message says why and what is accepted."""


def _preview(text: str, limit: int = 60) -> str:
    """A short, printable, always-encodable rendering of untrusted text for error messages."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return ascii(shown)


class ActionValidator:
    """Checks and translates action strings with BrowserGym's high-level grammar."""

    def __init__(self, subsets: Sequence[str], max_chars: int, multiaction: bool = False):
        if "python" in subsets:
            raise ValueError("the raw-Python action set is never allowed")
        self.max_chars = max_chars
        self.multiaction = multiaction
        # strict=True: parse_all, so `click('1'); __import__('os')` fails instead of skipping junk.
        self.action_set = HighLevelActionSet(subsets=list(subsets), multiaction=multiaction, strict=True)
        self.allowed_functions = sorted(self.action_set.action_set)

    def describe(self, with_long_description: bool = False, with_examples: bool = True) -> str:
        """The action space as text, for prompts."""
        return self.action_set.describe(with_long_description=with_long_description, with_examples=with_examples)

    def check(self, action_str: object) -> str:
        """Return the action string if it is acceptable, else raise InvalidActionError."""
        if not isinstance(action_str, str):
            raise InvalidActionError(f"action must be a string, got {type(action_str).__name__}")
        if len(action_str) > self.max_chars:
            raise InvalidActionError(
                f"action too long: {len(action_str)} characters, limit {self.max_chars}"
            )
        try:
            action_str.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidActionError(
                f"action is not valid Unicode text (lone surrogate / undecodable bytes): {_preview(action_str)}"
            ) from None
        if "\x00" in action_str:
            raise InvalidActionError("action contains a NUL character")
        if not action_str.strip():
            raise InvalidActionError(
                f"empty action; expected one call such as {self.action_set.example_action(abstract=False)!s}"
            )
        return action_str

    def to_python_code(self, action_str: object) -> str:
        """Validate, parse with the grammar and return the code BrowserGym will execute.

        Raises InvalidActionError (a ValueError) with a clear message for anything rejected.
        """
        text = self.check(action_str)
        try:
            return self.action_set.to_python_code(text)
        except NameError as e:
            # Unknown function (e.g. __import__, exec, goto when "nav" is not enabled).
            raise InvalidActionError(
                f"{e} Allowed functions: {', '.join(self.allowed_functions)}"
            ) from None
        except ValueError as e:
            raise InvalidActionError(f"{e} (action: {_preview(text)})") from None
        except Exception as e:  # pyparsing.ParseException and friends: not in the grammar
            raise InvalidActionError(
                f"could not parse action {_preview(text)}: expected "
                f"{'calls' if self.multiaction else 'one call'} like click('12') or fill('14', 'text') "
                f"with literal arguments ({type(e).__name__} at column {getattr(e, 'col', '?')})"
            ) from None

    # BrowserEnv takes `action_mapping=callable`: its exceptions become `last_action_error`.
    __call__ = to_python_code
