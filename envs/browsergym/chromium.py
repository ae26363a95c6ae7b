"""Finding Chromium and making BrowserGym launch it with our path and flags.

BrowserGym launches two browsers per reset (the task page and a chat panel) through the global
Playwright instance it keeps; the chat browser ignores `pw_chromium_kwargs`, and Playwright 1.44
has no environment variable for the browser path. So we wrap the `launch` method of that global
instance once per process, adding `executable_path` and flags to every launch.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
from typing import Any, Optional

logger = logging.getLogger(__name__)

# The real binary: Debian's /usr/bin/chromium is a wrapper script whose extra flags and dev-shm
# check misbehave in containers (seen with Debian 12's chromium package; the binary runs).
SYSTEM_CHROMIUM_CANDIDATES = (
    "/usr/lib/chromium/chromium",
    "/usr/lib/chromium-browser/chromium-browser",
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
)
CHROMIUM_ENV_VAR = "BGRPO_CHROMIUM"


class ChromiumNotFoundError(RuntimeError):
    """No usable Chromium: says where it looked and how to install one."""


def _is_executable(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def find_chromium(configured: Optional[str] = None, playwright_own: Optional[str] = None) -> Optional[str]:
    """Return the Chromium binary to pass as `executable_path`, or None for Playwright's own.

    Order: the configured path (must exist), then $BGRPO_CHROMIUM, then Playwright's own download
    (`playwright_own`, its expected path; None is returned so Playwright uses it natively), then the
    system's Chromium. Raises ChromiumNotFoundError when nothing is found.
    """
    if configured:
        if not _is_executable(configured):
            raise ChromiumNotFoundError(f"configured chromium_path {configured!r} is not an executable file")
        return configured
    from_env = os.environ.get(CHROMIUM_ENV_VAR)
    if from_env:
        if not _is_executable(from_env):
            raise ChromiumNotFoundError(f"${CHROMIUM_ENV_VAR}={from_env!r} is not an executable file")
        return from_env
    if _is_executable(playwright_own):
        return None
    for candidate in SYSTEM_CHROMIUM_CANDIDATES:
        if _is_executable(candidate):
            return candidate
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    raise ChromiumNotFoundError(
        "no Chromium found: set EnvConfig.chromium_path or $BGRPO_CHROMIUM, run `playwright install "
        f"chromium`, or `apt-get install chromium` (looked at {playwright_own}, "
        f"{', '.join(SYSTEM_CHROMIUM_CANDIDATES)})"
    )


_installed: Optional[tuple[Optional[str], tuple[str, ...]]] = None


def install_launch_wrapper(chromium_path: Optional[str], extra_args: list[str]) -> Optional[str]:
    """Make every browser BrowserGym launches in this process use our binary and flags.

    Must run on the thread that uses BrowserGym (its sync Playwright is bound to the thread that
    created it). Idempotent; returns the executable path in use (None = Playwright's own).
    """
    global _installed
    from browsergym.core import _get_global_playwright

    pw = _get_global_playwright()
    executable = find_chromium(chromium_path, pw.chromium.executable_path)
    wanted = (executable, tuple(extra_args))
    if _installed is not None:
        if _installed != wanted:
            logger.warning("Chromium launch wrapper already installed with %s; keeping it", _installed)
        return _installed[0]

    original_launch = pw.chromium.launch

    def launch(**kwargs: Any):
        if executable is not None:
            kwargs.setdefault("executable_path", executable)
        args = list(kwargs.get("args") or [])
        kwargs["args"] = args + [a for a in extra_args if a not in args]
        return original_launch(**kwargs)

    # An instance attribute shadows the bound method for both callers (env.py and chat.py).
    pw.chromium.launch = launch  # type: ignore[method-assign]
    _installed = wanted
    logger.info("BrowserGym launches Chromium from %s", executable or "Playwright's own download")
    return executable


def stop_global_playwright() -> bool:
    """Stop BrowserGym's global Playwright instance (its Node driver process) if this process
    started one; call it on the thread that used BrowserGym, after closing every env. Returns
    whether one was stopped. A later env starts a new instance (and re-installs the wrapper)."""
    global _installed
    import sys

    core = sys.modules.get("browsergym.core")
    pw = getattr(core, "_PLAYWRIGHT", None) if core is not None else None
    if pw is None:
        return False
    try:
        pw.stop()
    finally:
        core._PLAYWRIGHT = None  # type: ignore[union-attr]
        _installed = None
    return True


_cheap_stacks_installed = False
_FrameRecord = collections.namedtuple("_FrameRecord", "frame filename lineno function")


def install_cheap_call_stacks() -> None:
    """Make Playwright's sync API stop reading source files on every call.

    Playwright 1.44's sync wrapper records the caller's stack for error messages with
    `inspect.stack()` and `traceback.extract_stack()` on every API call; `inspect.stack()` reads
    and tokenizes the source file of every frame for its context lines, which Playwright never
    uses (it keeps file, line and function). Profiled in our env server, that was ~40 % of the
    Python time of a reset. Here both modules get an `inspect`/`traceback` whose `stack` and
    `extract_stack` skip the source lines; error messages keep file, line and function.
    Idempotent; process-wide (env server processes and in-process envs).
    """
    global _cheap_stacks_installed
    if _cheap_stacks_installed:
        return
    import inspect
    import sys
    import traceback
    import types

    from playwright._impl import _connection, _sync_base

    def stack(context: int = 0) -> list:
        # Playwright reads `.filename`, `.lineno` and `[0]` (the frame) of each record; building
        # them from the code objects avoids inspect's per-frame file-system lookups.
        records = []
        frame = sys._getframe(1)  # the caller, as inspect.stack() starts there
        while frame is not None:
            code = frame.f_code
            records.append(_FrameRecord(frame, code.co_filename, frame.f_lineno, code.co_name))
            frame = frame.f_back
        return records

    def extract_stack(f: Any = None, limit: Any = None) -> traceback.StackSummary:
        frame = f if f is not None else sys._getframe(1)
        summary = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=limit, lookup_lines=False)
        summary.reverse()
        return summary

    cheap_inspect = types.SimpleNamespace(**{**vars(inspect), "stack": stack})
    cheap_traceback = types.SimpleNamespace(**{**vars(traceback), "extract_stack": extract_stack})
    for module in (_connection, _sync_base):
        if getattr(module, "inspect", None) is inspect:
            module.inspect = cheap_inspect  # type: ignore[attr-defined]
        if getattr(module, "traceback", None) is traceback:
            module.traceback = cheap_traceback  # type: ignore[attr-defined]
    _cheap_stacks_installed = True
