"""Turns untrusted model text into one BrowserGym high-level action string, or a recorded fallback.

Behaviour (the seed gist's, made strict): strip chatter such as "Action:" prefixes and code fences,
take the first `name(...)` call whose name is an allowed action and whose parentheses and quotes
balance, check it is a plain call with literal arguments (so BrowserGym's grammar can parse it and
nothing else can hide in it), and otherwise fall back to `noop()`, recording that the fallback was
used and why. The env server validates again with BrowserGym's own grammar; this layer exists so
the worker never sends garbage and can count how often the policy produced none.

Nothing here evaluates model text: `ast.parse` only builds a syntax tree, and the arguments are
checked to be literals (strings, numbers, booleans, lists of those).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

# The env's default BrowserGym subset ("miniwob_all") without the low-level mouse moves, plus
# noop (BrowserGym always includes it). Element actions use bids; mouse_click uses the boxes.
DEFAULT_ACTIONS: tuple[str, ...] = (
    "noop",
    "click",
    "fill",
    "keyboard_press",
    "keyboard_type",
    "scroll",
    "mouse_click",
)

# Leading chatter the gist strips before looking for a call; matched case-insensitively, repeatedly.
_PREFIX_RE = re.compile(
    r"^\s*(?:(?:final\s+)?action|answer|next\s+action|response|output)\s*[:=\-]\s*",
    re.IGNORECASE,
)
_FENCE_RE = re.compile(r"```[a-zA-Z0-9_+-]*")
_CALL_START_RE = re.compile(r"(?<![A-Za-z0-9_.])([A-Za-z_][A-Za-z0-9_]*)\s*\(")


@dataclass(frozen=True)
class ParsedAction:
    """The action to send and how it was obtained."""

    action: str
    """A call of an allowed action with literal arguments, e.g. ``click('13')``; the fallback otherwise."""
    fallback: bool
    """True when no valid call was found and `action` is the fallback."""
    reason: str = ""
    """Why the fallback was used ("" when it was not)."""


class ActionParser:
    """Parses completions into actions; cheap, deterministic, never raises on any input text."""

    def __init__(
        self,
        allowed_actions: tuple[str, ...] | list[str] = DEFAULT_ACTIONS,
        max_action_chars: int = 512,
        max_scan_chars: int = 8192,
        fallback_action: str = "noop()",
    ) -> None:
        if not allowed_actions:
            raise ValueError("allowed_actions must name at least one action")
        for name in allowed_actions:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"action name {name!r} is not an identifier")
        if max_action_chars < 8:
            raise ValueError(f"max_action_chars must be >= 8, got {max_action_chars}")
        self.allowed = frozenset(allowed_actions)
        self.max_action_chars = max_action_chars
        # Only the head of a completion is scanned: a 1 MB completion costs the same as 8 KB.
        self.max_scan_chars = max_scan_chars
        self.fallback_action = fallback_action
        if self._validate_call(fallback_action) is None:
            raise ValueError(f"fallback_action {fallback_action!r} is not a valid allowed call")

    def parse(self, text: object) -> ParsedAction:
        """Returns the first valid allowed call in `text`, or the fallback with a reason."""
        if not isinstance(text, str):
            return self._fallback(f"completion is {type(text).__name__}, not text")
        head = text[: self.max_scan_chars]
        cleaned = self._strip_chatter(head)
        if not cleaned.strip():
            return self._fallback("empty completion")

        saw_unknown: str | None = None
        saw_invalid: str | None = None
        for match in _CALL_START_RE.finditer(cleaned):
            name = match.group(1)
            if name not in self.allowed:
                saw_unknown = saw_unknown or name
                continue
            end = _find_closing_paren(cleaned, match.end() - 1)
            if end is None:
                saw_invalid = saw_invalid or f"unbalanced parentheses or quotes after {name}("
                continue
            # Normalise "click ('3')" to "click('3')".
            candidate = name + cleaned[match.end() - 1 : end + 1]
            if len(candidate) > self.max_action_chars:
                saw_invalid = saw_invalid or (
                    f"{name}(...) is {len(candidate)} chars, over the {self.max_action_chars} limit"
                )
                continue
            if self._validate_call(candidate) is None:
                saw_invalid = saw_invalid or f"{name}(...) arguments are not plain literals"
                continue
            return ParsedAction(candidate, fallback=False)

        if saw_invalid:
            return self._fallback(saw_invalid)
        if saw_unknown:
            return self._fallback(f"no allowed action; first call was {saw_unknown!r}")
        return self._fallback("no action call found")

    # --- helpers ----------------------------------------------------------------------------

    def _fallback(self, reason: str) -> ParsedAction:
        return ParsedAction(self.fallback_action, fallback=True, reason=reason)

    @staticmethod
    def _strip_chatter(text: str) -> str:
        text = _FENCE_RE.sub("\n", text).replace("`", " ")
        lines = []
        for line in text.splitlines():
            prev = None
            while prev != line:  # "Action: Answer: click('1')"
                prev, line = line, _PREFIX_RE.sub("", line, count=1)
            lines.append(line)
        return "\n".join(lines)

    def _validate_call(self, candidate: str) -> ast.Call | None:
        """The call node when `candidate` is exactly `name(literal, ..., kw=literal)`, else None."""
        try:
            tree = ast.parse(candidate, mode="eval")
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return None
        call = tree.body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            return None
        if call.func.id not in self.allowed:
            return None
        args = list(call.args) + [kw.value for kw in call.keywords]
        if any(kw.arg is None for kw in call.keywords):  # **kwargs
            return None
        if not all(_is_literal(a) for a in args):
            return None
        return call


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, int, float, bool)) or node.value is None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
    if isinstance(node, (ast.List, ast.Tuple)):
        return all(_is_literal(e) for e in node.elts)
    return False


def _find_closing_paren(text: str, open_idx: int) -> int | None:
    """Index of the parenthesis closing the one at `open_idx`, skipping quoted strings; None if none."""
    depth = 0
    quote: str | None = None
    i = open_idx
    n = len(text)
    while i < n:
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
            elif ch == "\n":
                return None  # an action never spans lines inside a string: treat as unbalanced
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None
