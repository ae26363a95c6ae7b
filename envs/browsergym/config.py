"""Configuration of one BrowserGym environment (and of the server processes that host it)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

# Action subsets that may run arbitrary code or read local files: never accepted.
# "python" is BrowserGym's raw-Python action set (model text executed as Python); the high-level
# "bid"/"coord" subsets contain upload_file / mouse_upload_file (read any local file into the page)
# and "nav" contains goto (navigate to file:///etc/...), so they are opt-in, not the default.
FORBIDDEN_ACTION_SUBSETS = ("python",)
RESET_MODES = ("page", "context", "relaunch")
KNOWN_ACTION_SUBSETS = (
    "chat",
    "infeas",
    "bid",
    "coord",
    "nav",
    "tab",
    "miniwob_all",
    "miniwob_shi17",
    "miniwob_liu18",
    "miniwob_humphreys22",
    "webarena",
    "visualwebarena",
    "workarena",
    "workarena++",
    "weblinx",
    "assistantbench",
)


@dataclass
class EnvConfig:
    """One BrowserGym environment: which task, how actions are checked, how the browser runs."""

    task: str = "miniwob.click-test"
    """Default task, `<benchmark>.<task>` (e.g. `miniwob.click-test`) or a bare MiniWoB name
    (`click-test`). `reset(task=...)` can switch task per episode. A `recorded.*` task makes the
    server replay a recorded page without a browser (envs/recorded/)."""

    max_steps: int = 10
    """Steps per episode; the step that reaches it returns `done=True, truncated=True`."""

    action_subsets: list[str] = field(default_factory=lambda: ["miniwob_all"])
    """BrowserGym `HighLevelActionSet` subsets the model may use. `miniwob_all` = click, fill,
    keyboard_press/type, scroll and mouse actions by coordinates: no file upload, no navigation.
    The raw-Python action set is never allowed."""

    allow_multiaction: bool = False
    """Allow several action calls in one action string (BrowserGym's `multiaction`)."""

    max_action_chars: int = 2000
    """Longest accepted action string; longer ones are rejected before parsing."""

    pre_observation_delay: float = 0.0
    """Seconds BrowserGym waits after an action before reading the page (its default is 0.5).
    0 measured ~180 ms per step against ~790 ms (in-process, 2-core machine, with slow_mo 0)
    and the six reference MiniWoB tasks still score 1.0; raise it for tasks with delayed page updates (autocomplete menus)."""

    slow_mo: Optional[int] = 0
    """Playwright slow-motion delay in ms for every browser operation (MiniWoB tasks ask 100;
    None = the task's own). It paces actions for a human watching; no MiniWoB reward depends on
    it (tests/test_env_fast_reset.py), so 0 is the default."""

    reset_mode: str = "page"
    """How `reset` starts an episode. Every mode gives the same task instance per seed as
    BrowserGym's own reset (tests/test_env_fast_reset.py, 14 MiniWoB tasks). `page` (default): the
    session keeps one Chromium and, for MiniWoB, one page: the next episode of the same task
    restarts in it (MiniWoB's own `core.startEpisodeReal`, the seed draw BrowserGym makes), another
    MiniWoB task is loaded into it by navigation; storage, cookies and navigation history are
    cleared between episodes, a fresh context every 100 episodes and for other benchmarks. Within
    one task's restarts the page's JavaScript globals carry over, as in MiniWoB's own harness.
    `context`: a fresh browser context and page per episode (Playwright's isolation unit; a new
    renderer and page load every episode: 0.65 s against 0.20 s for a restart and 0.27 s for a
    navigation, bench/bench_env.py --reset-phases on 2 cores). `relaunch`: BrowserGym's own
    reset, which closes and relaunches Chromium plus a chat-window Chromium every episode (the
    seed's pattern; bench/bench_rollout.py compares the three)."""

    browser_max_episodes: int = 500
    """`page`/`context` modes: relaunch the session's Chromium after this many episodes (0 =
    never), so a slow leak in a long-lived browser cannot build up."""

    browser_max_memory_mb: float = 1500.0
    """`page`/`context` modes: relaunch the session's Chromium at the next reset once the summed
    RSS of its process tree passes this many MiB (0 = never; shared pages count once per process,
    so the sum overstates what the browser holds)."""

    action_timeout_ms: Optional[int] = None
    """Playwright timeout of one browser operation (None = the task's own, 5000 ms for MiniWoB)."""

    headless: bool = True
    """Run Chromium headless."""

    chromium_path: Optional[str] = None
    """Chromium binary. None = auto: $BGRPO_CHROMIUM, then Playwright's own download, then the
    system's `/usr/lib/chromium/chromium` (the real binary, not the /usr/bin wrapper script)."""

    chromium_args: list[str] = field(
        default_factory=lambda: [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-crash-reporter",
            "--disable-breakpad",
        ]
    )
    """Extra Chromium flags, added to every browser BrowserGym launches (page and chat)."""

    viewport: Optional[dict[str, int]] = None
    """`{"width": W, "height": H}`; None = the task's own (MiniWoB: 332x214 CSS px)."""

    miniwob_url: Optional[str] = None
    """Base URL of the MiniWoB pages (trailing slash). None = `file://` URL of the `miniwob`
    package's `html/miniwob/` folder: no HTTP server needed."""

    include_screenshot: bool = True
    """Send the screenshot as base64 PNG (`screenshot_png_b64`). With this and
    `include_screenshot_array` both off, the `context`/`page` modes do not capture it at all
    (Chromium's capture is ~70 ms of a ~150 ms MiniWoB observation); `bgrpo train` sets it from
    `rollout.prompt.include_screenshot`."""

    include_screenshot_array: bool = False
    """Also fill upstream OpenEnv's `screenshot` field (nested integer lists, ~2.4 MB and ~1 s CPU
    per MiniWoB step): only for upstream clients that need it."""

    include_pruned_html: bool = True
    """Send the pruned HTML (`pruned_html`); some targets (click-link) have bids only there."""

    max_sessions: int = 2
    """WebSocket sessions one server process accepts at once (each has its own browsers; all run
    on the server's single Playwright thread, so scale with processes, not sessions)."""

    session_timeout_s: Optional[float] = None
    """Close a WebSocket session (and its browsers) idle this long; None = never (the default).
    A session ends when its WebSocket closes, and the WebSocket's pings find a client that is gone,
    so the idle timeout only frees sessions of clients that keep their socket open and stop using
    it. Off by default: a rollout worker's sessions sit idle while the learner trains, and once a
    15-minute GRPO phase outlasted the old 600 s default, so every session was closed under its
    worker and the next evaluation's resets failed (openenv then runs a closed session's calls on
    another thread), costing 4 env-server restarts."""

    def validate(self) -> "EnvConfig":
        """Raise ValueError with a clear message on a bad value; return self."""
        if not isinstance(self.task, str) or not self.task.strip():
            raise ValueError("EnvConfig.task must be a task name such as 'miniwob.click-test'")
        if self.max_steps < 1:
            raise ValueError(f"EnvConfig.max_steps must be >= 1, got {self.max_steps}")
        if not self.action_subsets:
            raise ValueError("EnvConfig.action_subsets must name at least one subset")
        for subset in self.action_subsets:
            if subset in FORBIDDEN_ACTION_SUBSETS:
                raise ValueError(
                    f"EnvConfig.action_subsets may not contain {subset!r}: it executes model "
                    "output as Python"
                )
            if subset not in KNOWN_ACTION_SUBSETS:
                raise ValueError(
                    f"unknown action subset {subset!r}; choose from {', '.join(KNOWN_ACTION_SUBSETS)}"
                )
        if not 1 <= self.max_action_chars <= 1_000_000:
            raise ValueError(f"EnvConfig.max_action_chars must be in [1, 1e6], got {self.max_action_chars}")
        if self.pre_observation_delay < 0:
            raise ValueError("EnvConfig.pre_observation_delay must be >= 0 seconds")
        if self.slow_mo is not None and self.slow_mo < 0:
            raise ValueError("EnvConfig.slow_mo must be >= 0 ms")
        if self.reset_mode not in RESET_MODES:
            raise ValueError(f"EnvConfig.reset_mode must be one of {', '.join(RESET_MODES)}, got {self.reset_mode!r}")
        if self.browser_max_episodes < 0:
            raise ValueError("EnvConfig.browser_max_episodes must be >= 0 (0 = never recycle)")
        if self.browser_max_memory_mb < 0:
            raise ValueError("EnvConfig.browser_max_memory_mb must be >= 0 (0 = no limit)")
        if self.action_timeout_ms is not None and self.action_timeout_ms <= 0:
            raise ValueError("EnvConfig.action_timeout_ms must be > 0 or None")
        if self.viewport is not None:
            if set(self.viewport) != {"width", "height"} or min(self.viewport.values()) <= 0:
                raise ValueError("EnvConfig.viewport must be {'width': W, 'height': H} with W, H > 0")
        if self.max_sessions < 1:
            raise ValueError("EnvConfig.max_sessions must be >= 1")
        if self.session_timeout_s is not None and self.session_timeout_s <= 0:
            raise ValueError("EnvConfig.session_timeout_s must be > 0 or None")
        return self

    # The pool hands the config to server processes as JSON on their command line.
    def to_json(self) -> str:
        """The config as a JSON string (round-trips through `from_json`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EnvConfig":
        """Build (and validate) a config from `to_json` output; unknown keys are an error."""
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EnvConfig keys: {', '.join(unknown)}")
        return cls(**data).validate()


MAX_SEED = 2**32 - 1  # numpy RandomState's range, which BrowserGym tasks seed


def reset_seed(seed: Any, extra_kwargs: dict[str, Any]) -> int:
    """The checks every env's `reset` makes on its arguments: no unknown keyword, a seed in
    [0, MAX_SEED] (a random one when None). Returns the seed; ValueError otherwise."""
    import random

    if extra_kwargs:
        raise ValueError(f"unknown reset arguments: {', '.join(sorted(extra_kwargs))} (accepted: seed, episode_id, task)")
    if seed is None:
        seed = random.randrange(MAX_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return seed


def qualify_task_name(task: str) -> str:
    """`click-test` -> `miniwob.click-test`; names that already carry a benchmark are kept."""
    task = task.strip()
    if task.startswith("browsergym/"):
        task = task[len("browsergym/") :]
    return task if "." in task else f"miniwob.{task}"
