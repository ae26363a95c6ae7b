"""One Chromium per env session, kept across episodes; MiniWoB episodes keep its page too.

BrowserGym 0.14.3's `BrowserEnv.reset` closes and relaunches Chromium on every episode, plus a
second Chromium for its chat window (`core/chat.py`): 1.1-2.6 s per reset measured on a 2-core
machine (`python bench/bench_rollout.py --skip-engine` times the stock reset against this one).
Here a session launches Chromium once (`KeptBrowser`). With `reset_mode="context"` each episode
gets a new browser context and page (`PersistentBrowserEnv.reset`): the context is Playwright's
isolation unit (its own cookies, localStorage, cache and history), and the task is set up exactly
as BrowserGym does it (same task object from the same seed, same page URL, same init script), so a
seed gives the same task instance as the stock reset (tests/test_env_fast_reset.py checks goal,
layout and the first screenshot against it).

`reset_mode="page"` (the default) keeps the session's page across MiniWoB episodes as well, the
way MiniWoB's own harness runs episodes: the next episode of the same task restarts in the page
(`core.endEpisode(0)` then `core.startEpisodeReal()`, with the seed draw BrowserGym makes), and an
episode of another MiniWoB task is loaded into the same page by navigation (`task.setup` on it).
Between episodes the page's storage and cookies are cleared and its navigation history is reset,
so what a context would isolate does not leak either; what remains shared is the renderer process
and, within one task's restarts, the page's JavaScript globals (MiniWoB's harness shares them the
same way; an agent's actions cannot set them: no script or navigation action is allowed). It skips
the new context, renderer and page load (bench/bench_env.py --reset-phases, 2-core machine: a
restart 0.20 s in-process, another task 0.27 s against 0.65 s for a fresh context and page).

The chat window is replaced by `ChatLog`, the same message list without a browser: MiniWoB tasks
never read the chat, and `send_msg_to_user` / `report_infeasible` still record their messages.

A long-lived browser grows (caches, leaked renderer memory), so `KeptBrowser` relaunches itself
after `browser_max_episodes` episodes or when its process tree passes `browser_max_memory_mb`,
checked between episodes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import pkgutil
import time
from typing import Any, Iterator, Literal, Optional

import playwright.sync_api

import browsergym.core.env as browsergym_env
import browsergym.core.observation as browsergym_observation
from browsergym.core import _get_global_playwright
from browsergym.core.constants import BROWSERGYM_ID_ATTRIBUTE
from browsergym.core.env import BrowserEnv

logger = logging.getLogger(__name__)

# BrowserGym's page-activation hook, verbatim from browsergym 0.14.3 core/env.py (reset): it tells
# the env which page is active, since Playwright has no such notion.
_PAGE_ACTIVATION_SCRIPT = r"""
window.browsergym_page_activated();
window.addEventListener("focus", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("focusin", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("load", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("pageshow", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("mousemove", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("mouseup", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("mousedown", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("wheel", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("keyup", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("keydown", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("input", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("touchstart", () => {window.browsergym_page_activated();}, {capture: true});
window.addEventListener("touchend", () => {window.browsergym_page_activated();}, {capture: true});
document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") {
        window.browsergym_page_activated();
    }
}, {capture: true});
"""


# reset_mode="page": a page serves at most this many episodes before a fresh context and page
# (MiniWoB's own harness reloads its page every N episodes against slow leaks in the page; a
# navigation frees the document but keeps the renderer process, so it counts too).
PAGE_MAX_EPISODES = 100

# What an episode may have left in the page's origin, cleared before the next episode starts there
# (a navigation keeps sessionStorage for the same origin, and MiniWoB pages share one origin).
_CLEAR_STORAGE = "localStorage.clear(); sessionStorage.clear();"
_CLEAR_STORAGE_SCRIPT = "() => { " + _CLEAR_STORAGE + " }"

# The restart clears storage in the same page call (one round trip per reset).
_IN_PAGE_RESTART_SCRIPT = r"""
([seed, maxTime]) => {
    """ + _CLEAR_STORAGE + r"""
    if (document.activeElement && document.activeElement.blur) { document.activeElement.blur(); }
    for (const element of document.querySelectorAll('[bid]')) { element.removeAttribute('bid'); }
    window.browsergym_elem_counter = 0;
    core.endEpisode(0);  // no-op when the episode already ended (its timer is cleared)
    Math.seedrandom(seed);
    core.EPISODE_MAX_TIME = maxTime;
    core.startEpisodeReal();
    return WOB_TASK_READY;  // MiniWoB's tasks set it synchronously: no separate wait needed
}
"""


# BrowserGym's element marking (javascript/frame_mark_elements.js) ends by waiting until an
# IntersectionObserver has reported every marked element's visibility, polling every 40 ms. The
# reports arrive with the next rendered frame, so most of that poll is idle: 46 ms of the 152 ms an
# observation took (bench/bench_env.py --reset-phases). Polling every 2 ms gives the same marks and
# visibility ratios (the same callback fills them) about 30 ms sooner, on every reset and step.
_MARK_SCRIPT = "javascript/frame_mark_elements.js"
_MARK_POLL_STOCK = "async function until(f, timeout, interval=40)"
_MARK_POLL_FAST = "async function until(f, timeout, interval=2)"


def _fast_mark_script() -> Optional[str]:
    """BrowserGym's marking script with the short poll, or None if this BrowserGym's script does
    not have the expected poll (then the stock marking runs)."""
    stock = pkgutil.get_data("browsergym.core", _MARK_SCRIPT).decode("utf-8")
    if _MARK_POLL_STOCK not in stock:
        logger.warning("BrowserGym's marking script changed; using it unmodified")
        return None
    return stock.replace(_MARK_POLL_STOCK, _MARK_POLL_FAST)


_FAST_MARK_SCRIPT = _fast_mark_script()


class _FastMarkScript:
    """Stands in for `pkgutil` in browsergym.core.observation while `_fast_marking` is on: its
    `_pre_extract` reads the marking script through `pkgutil.get_data` on every call, and gets the
    short-poll version; every other resource (the unmarking script) is read as stored. So the stock
    marking code runs unchanged, with only its script's poll interval different."""

    @staticmethod
    def get_data(package: str, resource: str) -> Optional[bytes]:
        if resource == _MARK_SCRIPT:
            return _FAST_MARK_SCRIPT.encode("utf-8")
        return pkgutil.get_data(package, resource)


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    """`module.name` is `value` inside the block, and what it was before after it. Swapping a module
    global of BrowserGym is safe here: every env of a process runs on its one Playwright thread, so
    no other observation (a stock env's included) is taken while the swap is in place."""
    stock = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, stock)


def _fast_marking() -> contextlib.AbstractContextManager:
    """BrowserGym's `_get_obs` with `_FastMarkScript` in place of the observation module's `pkgutil`
    (the stock marking when its script lacks the expected poll)."""
    if _FAST_MARK_SCRIPT is None:
        return contextlib.nullcontext()
    return _swapped(browsergym_observation, "pkgutil", _FastMarkScript)


def _no_screenshot(page: Any) -> None:
    return None


def _page_devtools(page: Any) -> Any:
    """The page's DevTools session, opened once and kept with the page (it ends with the page)."""
    session = getattr(page, "_bgrpo_devtools", None)
    if session is None:
        session = page.context.new_cdp_session(page)
        page._bgrpo_devtools = session
    return session


def _screenshot_keeping_viewport(page: Any) -> Any:
    """BrowserGym's `extract_screenshot` (the same device metrics at the task's scale factor, the
    same capture, the same decoding), through the page's kept DevTools session. BrowserGym's opens
    a session per capture and detaches it, and the detach drops the page's device metrics: the
    layout viewport then falls back to what Chromium has (780x493 CSS px instead of MiniWoB's
    332x214 on a fresh page; 332x127 after a navigation, where elements below 127 px count as
    invisible), racing with the next observation. Kept, the session leaves the page at the task's
    viewport after every capture, so each observation is read at the same layout. (Sending the two
    metric overrides only when they change was tried: the same wall time, the capture waiting for
    rendered frames either way, and the same CPU per reset, 90.5 against 91.0 ms.)"""
    import numpy as np
    import PIL.Image

    viewport = page.viewport_size
    if viewport is None:  # no emulated viewport (resizeable windows): nothing to keep
        return browsergym_observation.extract_screenshot(page)
    session = _page_devtools(page)
    metrics = {"width": viewport["width"], "height": viewport["height"], "mobile": False}
    session.send("Emulation.setDeviceMetricsOverride",
                 {**metrics, "deviceScaleFactor": getattr(page, "_bgym_scale_factor", 1.0)})
    answer = session.send("Page.captureScreenshot", {"format": "png"})
    session.send("Emulation.setDeviceMetricsOverride", {**metrics, "deviceScaleFactor": 1.0})
    with io.BytesIO(base64.b64decode(answer["data"])) as png:
        return np.array(PIL.Image.open(png).convert(mode="RGB"))


def _screenshot_capture(capture: bool) -> contextlib.AbstractContextManager:
    """BrowserGym's `_get_obs` with `_screenshot_keeping_viewport` as its screenshot capture, or
    with none (the observation's `screenshot` is None) when not `capture`: the capture is ~65 ms
    of a MiniWoB observation, and a text-only model never sees it (bench/bench_env.py
    --reset-phases)."""
    return _swapped(browsergym_env, "extract_screenshot", _screenshot_keeping_viewport if capture else _no_screenshot)


class _KeptSessionView:
    """The page's kept DevTools session as BrowserGym's extractors use a fresh one: `send`, and a
    `detach` that leaves the session open (it ends with the page)."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def send(self, method: str, params: Optional[dict] = None) -> Any:
        return self._session.send(method, params)

    def detach(self) -> None:
        return None


# BrowserGym's extract_focused_element_bid in one page call: the same walk through shadow roots to
# the active element, then that element's bid. Stock makes 3-4 Playwright round trips per frame
# level (evaluate_handle, as_element, content_frame, get_attribute; 10 ms a MiniWoB observation)
# and never disposes its handle. An active element that owns a frame returns null: the stock code
# then dives into the frame.
_FOCUSED_ELEMENT_SCRIPT = """(bidAttribute) => {
    function activeElement(root) {
        const element = root.activeElement;
        if (!element) { return null; }
        return element.shadowRoot ? activeElement(element.shadowRoot) : element;
    }
    const element = activeElement(document);
    if (!element) { return ""; }
    if (["IFRAME", "FRAME", "OBJECT", "EMBED", "FENCEDFRAME", "PORTAL"].includes(element.tagName)) { return null; }
    return element.getAttribute(bidAttribute) || "";
}"""


def _focused_element_bid(page: Any) -> str:
    """The bid of the page's focused element, "" when none: BrowserGym's extract_focused_element_bid
    in one round trip, or BrowserGym's own when the focus is inside a frame."""
    try:
        bid = page.evaluate(_FOCUSED_ELEMENT_SCRIPT, BROWSERGYM_ID_ATTRIBUTE)
    except playwright.sync_api.TimeoutError:  # as stock: a timeout reads as no focus
        return ""
    if bid is None:
        return browsergym_observation.extract_focused_element_bid(page)
    return bid


@contextlib.contextmanager
def _kept_devtools_reads(page: Any) -> Iterator[None]:
    """Inside the block, BrowserGym's observation reads the page through the page's kept DevTools
    session and reads the focused element with `_focused_element_bid`. Its DOM snapshot and
    accessibility tree extractors otherwise open a session each (three per observation) and detach
    it: 2 round trips and a session attach each, about 13 ms of a MiniWoB observation. The answers
    are the same (tests/test_env_fast_reset.py compares them). The page's context answers
    `new_cdp_session` for this page with a view of the kept session (an instance attribute over the
    class's method, removed after the block); other pages get fresh sessions as before."""
    session = _page_devtools(page)  # opened before the swap: it opens through the real method
    context = page.context
    open_session = context.new_cdp_session

    def new_cdp_session(target: Any) -> Any:
        return _KeptSessionView(session) if target is page else open_session(target)

    context.new_cdp_session = new_cdp_session
    try:
        with _swapped(browsergym_env, "extract_focused_element_bid", _focused_element_bid):
            yield
    finally:
        del context.new_cdp_session


class ChatLog:
    """BrowserGym's `Chat` without its browser window: the same `messages` list and `add_message`."""

    ROLES = ("user", "user_image", "assistant", "info", "infeasible")

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def add_message(self, role: Literal["user", "user_image", "assistant", "info", "infeasible"], msg: str) -> None:
        if role not in self.ROLES:
            raise ValueError(f"Invalid role: {role}")
        if role != "info":  # as Chat: "info" messages are shown in the window, not recorded
            self.messages.append({"role": role, "timestamp": time.time(), "message": msg})

    def wait_for_user_message(self) -> None:
        raise RuntimeError("waiting for a user message needs BrowserGym's chat window (reset_mode='relaunch')")

    def close(self) -> None:
        pass


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB (0 if it is gone). RSS counts
    shared pages once per process (941 MiB summed against 388 MiB of PSS, measured with one
    MiniWoB page), but reads in 3 ms where PSS takes 19 ms: this runs on every reset."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


class KeptBrowser:
    """A Chromium launched on first use and kept until it is recycled or closed.

    Must be used on the Playwright thread (BrowserGym's sync Playwright is bound to it).
    """

    def __init__(self, headless: bool, max_episodes: int = 0, max_memory_mb: float = 0.0,
                 launch_kwargs: Optional[dict[str, Any]] = None) -> None:
        self.headless = headless
        self.max_episodes = max_episodes
        self.max_memory_mb = max_memory_mb
        self.launch_kwargs = dict(launch_kwargs or {})
        self.browser: Any = None
        self.pid: Optional[int] = None
        self.slow_mo: Optional[int] = None
        self.episodes = 0  # episodes started on the current browser
        self.launches = 0
        self.recycles = 0  # relaunches for age or memory (not counting the first launch or crashes)
        self.last_recycle_reason = ""
        self.recycled_now = False  # whether the last browser_for_episode recycled the browser

    def browser_for_episode(self, slow_mo: int) -> tuple[Any, bool]:
        """The browser for the next episode, launching or recycling it as needed. Returns
        (browser, launched_now)."""
        reason = self._recycle_reason(slow_mo)
        launched = False
        self.recycled_now = False
        if reason:
            if self.browser is not None:
                logger.info("relaunching Chromium (pid %s): %s", self.pid, reason)
                if reason.startswith(("episodes", "memory")):
                    self.recycles += 1
                    self.recycled_now = True
                    self.last_recycle_reason = reason
            self.close()
            self._launch(slow_mo)
            launched = True
        self.episodes += 1
        return self.browser, launched

    def memory_mb(self) -> float:
        """RSS of the browser's process tree in MiB (0 when no browser runs)."""
        return process_tree_rss_mb(self.pid) if self.pid else 0.0

    def close(self) -> None:
        browser, self.browser, self.pid = self.browser, None, None
        if browser is None:
            return
        try:
            browser.close()
        except Exception as e:  # a crashed browser must not stop the next launch
            logger.warning("closing Chromium failed: %s: %s", type(e).__name__, e)

    def _recycle_reason(self, slow_mo: int) -> str:
        if self.browser is None:
            return "first launch"
        if not self.browser.is_connected():
            return "browser disconnected"
        if slow_mo != self.slow_mo:  # slow_mo is a launch option of Playwright
            return f"slow_mo changed {self.slow_mo} -> {slow_mo}"
        if self.max_episodes and self.episodes >= self.max_episodes:
            return f"episodes: {self.episodes} reached browser_max_episodes={self.max_episodes}"
        if self.max_memory_mb:
            used = self.memory_mb()
            if used > self.max_memory_mb:
                return f"memory: {used:.0f} MiB over browser_max_memory_mb={self.max_memory_mb:g}"
        return ""

    def _launch(self, slow_mo: int) -> None:
        pw = _get_global_playwright()
        # The same launch as BrowserGym's reset (its scrollbar flags: otherwise screenshots miss
        # the scrollbars); our executable and flags are added by chromium.install_launch_wrapper.
        self.browser = pw.chromium.launch(
            headless=self.headless,
            slow_mo=slow_mo,
            args=["--disable-features=OverlayScrollbars,ExtendedOverlayScrollbars"],
            ignore_default_args=["--hide-scrollbars"],
            **self.launch_kwargs,
        )
        self.slow_mo = slow_mo
        self.episodes = 0
        self.launches += 1
        try:
            cdp = self.browser.new_browser_cdp_session()
            info = cdp.send("SystemInfo.getProcessInfo")
            cdp.detach()
            self.pid = next(int(p["id"]) for p in info["processInfo"] if p.get("type") == "browser")
        except Exception as e:  # memory checks need the pid; the browser works without it
            logger.warning("could not read Chromium's pid (memory limit off for it): %s", e)
            self.pid = None


class PersistentBrowserEnv(BrowserEnv):
    """BrowserGym's `BrowserEnv` whose reset reuses one kept browser, and its page or a fresh context.

    `reset` mirrors browsergym 0.14.3's `BrowserEnv.reset` step for step, except: the browser
    comes from `KeptBrowser` (not launched here, not closed by the next reset), the chat is a
    `ChatLog` (no window), and the page history starts empty. `step`, the observation and the
    task's validation are BrowserGym's own.
    """

    def __init__(self, task_entrypoint: Any, kept_browser: KeptBrowser, in_page_restart: bool = False,
                 capture_screenshot: bool = True, **kwargs: Any) -> None:
        super().__init__(task_entrypoint, **kwargs)
        if self.resizeable_window or self.record_video_dir or self.wait_for_user_message:
            raise ValueError("PersistentBrowserEnv supports neither resizeable windows, video nor "
                             "waiting for user messages: use reset_mode='relaunch'")
        self.kept_browser = kept_browser
        self.in_page_restart = in_page_restart
        self.capture_screenshot = capture_screenshot  # False: observations carry screenshot None
        self.launched_browser = False  # whether the last reset (re)launched Chromium
        self.page_episodes = 0  # episodes served by the current page
        # How the last reset started its episode: "context" (fresh context and page), "restart"
        # (MiniWoB's restart in the page of the last episode) or "navigate" (another MiniWoB task
        # loaded into that page); the last two need reset_mode="page".
        self.last_reset = ""
        self._context_options: tuple = ()  # (viewport, locale, timezone_id) of the open context

    def reset(self, seed: Optional[int] = None, *args: Any, **kwargs: Any) -> tuple[dict, dict]:
        super(BrowserEnv, self).reset(seed=seed, *args, **kwargs)  # gym.Env.reset: seeds nothing we use
        self.np_random = None  # all randomness is the task's, as in BrowserGym

        # --- the task, from the seed (the same object BrowserGym's reset builds) ---
        previous_task = self.task
        if previous_task is not None:
            previous_task.teardown()
        self.task = self.task_entrypoint(seed=seed, **self.task_kwargs)
        viewport = self._override("viewport")
        slow_mo = self._override("slow_mo")
        timeout = self._override("timeout")
        locale = self._override("locale")
        timezone_id = self._override("timezone_id")

        pw = _get_global_playwright()
        if getattr(pw, "_bgrpo_test_id_attribute", None) != BROWSERGYM_ID_ATTRIBUTE:
            # Process-wide in Playwright: set once (BrowserGym's reset sets it every episode, one
            # driver round trip each; every env in a process sets the same constant).
            pw.selectors.set_test_id_attribute(BROWSERGYM_ID_ATTRIBUTE)
            pw._bgrpo_test_id_attribute = BROWSERGYM_ID_ATTRIBUTE
        self.browser, self.launched_browser = self.kept_browser.browser_for_episode(slow_mo or 0)
        self.chat = ChatLog()

        how = self._page_reuse(previous_task, viewport, locale, timezone_id)
        if how == "restart":
            # --- MiniWoB's own restart on the page of the last episode (same task) ---
            task_goal, task_info = self._restart_in_page()
        elif how == "navigate":
            # --- another MiniWoB task, loaded into the page of the last episode ---
            task_goal, task_info = self._navigate_in_page(timeout)
        else:
            # --- a fresh context and page (the last episode's storage and history go away) ---
            self._new_context_and_page(viewport, locale, timezone_id, timeout)
            task_goal, task_info = self.task.setup(page=self.page)
            how = "context"
        self.last_reset = how
        self.page_episodes += 1
        self._set_goal(task_goal)

        self._wait_dom_loaded()
        # No wait for a painted frame here: the observation's element marking waits for the
        # visibility reports of the next rendered frame, and the DOM snapshot, accessibility tree
        # and screenshot force the layout they read. A two-frame wait here (27 ms a reset) was
        # added against a first observation of click-collapsible that once lacked the accordion
        # header. The likely cause, found later, was BrowserGym's screenshot leaving the page laid
        # out at 332x127 CSS px (see _screenshot_keeping_viewport); without the wait, the stock
        # comparisons of tests/test_env_fast_reset.py pass, under load too.
        self._active_page_check()
        self.start_time = time.time()
        self.last_action = ""
        self.last_action_error = ""
        self.infeasible_message_received = False
        obs = self._get_obs()
        return obs, {"task_info": task_info}

    def switch_task(self, task_entrypoint: Any) -> None:
        """The next reset builds its task from `task_entrypoint` (same benchmark, same task
        kwargs); the open context and page stay, so reset_mode="page" can navigate them."""
        self.task_entrypoint = task_entrypoint

    def _new_context_and_page(self, viewport: Any, locale: Any, timezone_id: Any, timeout: Any) -> None:
        """A fresh browser context and page on the kept browser, wired as BrowserGym's reset
        wires them (page activation binding and script, default timeout). The last one is closed
        first: one context at a time. Tried and dropped: keeping the pages of recent tasks open
        (one context each) to restart in them on the task's next episode. With a second context
        open in the same headless Chromium, new pages were laid out at 500x127 CSS px instead of
        780x493, elements below that line lost their visibility, and the first observation
        differed from BrowserGym's for the same seed (enter-password and login-user lost their
        text boxes)."""
        self._close_context()
        self.context = self.browser.new_context(
            viewport=viewport, locale=locale, timezone_id=timezone_id, **self.pw_context_kwargs
        )
        self._context_options = (viewport, locale, timezone_id)
        self.context.set_default_timeout(timeout)
        self.context.expose_binding(
            "browsergym_page_activated", lambda source: self._activate_page_from_js(source["page"])
        )
        self.context.add_init_script(_PAGE_ACTIVATION_SCRIPT)
        self.page_history = {}
        self.page = self.context.new_page()
        self.page_episodes = 0

    def _set_goal(self, task_goal: Any) -> None:
        """The goal object and the chat messages BrowserGym's reset makes from the task's goal."""
        if task_goal is None:
            self.goal_object = []
        elif isinstance(task_goal, str):
            self.goal_object = [{"type": "text", "text": task_goal}]
        elif isinstance(task_goal, list):
            self.goal_object = task_goal
        else:
            raise ValueError(f"task_goal should be of type str or list, got {task_goal.__class__}")
        self.chat.add_message(
            role="assistant",
            msg="Hi! I am your UI assistant, I can perform web tasks for you. What can I help you with?",
        )
        for message in self.goal_object:
            if message["type"] == "text":
                self.chat.add_message(role="user", msg=message["text"])
            elif message["type"] == "image_url":
                image_src = message["image_url"]
                self.chat.add_message(role="user_image", msg=image_src["url"] if isinstance(image_src, dict) else image_src)
            else:
                raise ValueError(f"Unknown message type {message['type']!r} in the task goal.")

    def _get_obs(self) -> dict:
        # BrowserGym's observation, with its element marking's idle poll shortened (_fast_marking),
        # its screenshot capture keeping the page's viewport (or none for text-only consumers), its
        # DevTools reads through the page's kept session and the focused element read in one call.
        with _fast_marking(), _screenshot_capture(self.capture_screenshot), _kept_devtools_reads(self.page):
            return super()._get_obs()

    def close(self) -> None:
        """Ends the episode; the kept browser stays (its owner closes it)."""
        if self.task is not None:
            self.task.teardown()
            self.task = None
        self._close_context()

    def _page_reuse(self, previous_task: Any, viewport: Any, locale: Any, timezone_id: Any) -> str:
        """reset_mode="page": how this episode can reuse the last episode's page: "restart" when it
        ran the same MiniWoB task, "navigate" when it ran another one; "" (a fresh context) unless
        the browser is the same (still connected), the page is the context's only one, still on
        the last task's URL, has served fewer than PAGE_MAX_EPISODES episodes, and the new task
        asks the same viewport, locale and time zone (context options)."""
        from browsergym.miniwob.base import AbstractMiniwobTask

        reusable = (
            self.in_page_restart
            and not self.launched_browser
            and isinstance(self.task, AbstractMiniwobTask)
            and isinstance(previous_task, AbstractMiniwobTask)
            and self.context is not None
            and self.page is not None
            and len(self.context.pages) == 1
            and not self.page.is_closed()
            and self.page.url == previous_task.url
            and self.page_episodes < PAGE_MAX_EPISODES
            and self._context_options == (viewport, locale, timezone_id)
        )
        if not reusable:
            return ""
        return "restart" if type(previous_task) is type(self.task) else "navigate"

    def _restart_in_page(self) -> tuple[str, dict]:
        """What AbstractMiniwobTask.setup does after loading the page, on the loaded page: the same
        seed draw, `Math.seedrandom`, `core.startEpisodeReal()`. Before it, the page forgets the
        last episode: storage and cookies cleared, focus dropped, BrowserGym's element ids
        removed and its counter reset (so the new elements get the ids a fresh page gives), and
        the navigation history reset (an agent's `history.pushState` is not an action, but a
        page's own script could push)."""
        task = self.task
        task.page = self.page
        js_seed = task.random.randint(0, 1000000)  # the draw setup() makes, from the same RandomState
        self.context.clear_cookies()
        if not self.page.evaluate(_IN_PAGE_RESTART_SCRIPT, [js_seed, task.episode_max_time]):
            self.page.wait_for_function("() => WOB_TASK_READY")  # what setup() waits for
        self._reset_history()
        return task._get_goal(), task._get_info()

    def _navigate_in_page(self, timeout: Any) -> tuple[str, dict]:
        """Another MiniWoB task in the page of the last episode: its storage and cookies cleared,
        then the task's own setup (`page.goto` of its URL, the seed draw, `startEpisodeReal`) on
        that page, then the navigation history reset, so the back list does not hold the last
        task. The new document has no element ids and a fresh BrowserGym counter, as a new page."""
        self.page.evaluate(_CLEAR_STORAGE_SCRIPT)
        self.context.clear_cookies()
        self.context.set_default_timeout(timeout)
        task_goal, task_info = self.task.setup(page=self.page)
        self._reset_history()
        return task_goal, task_info

    def _reset_history(self) -> None:
        """The page's back/forward list emptied (Chrome DevTools `Page.resetNavigationHistory`),
        as a fresh page has it, and BrowserGym's page bookkeeping to this one page."""
        _page_devtools(self.page).send("Page.resetNavigationHistory")
        self.page_history = {self.page: None}

    def _close_context(self) -> None:
        context = self.context
        self.context, self.page = None, None
        if context is not None:
            try:
                context.close()
            except Exception as e:  # a crashed browser: the next reset relaunches it
                logger.warning("closing the episode's browser context failed: %s: %s", type(e).__name__, e)

    def _override(self, name: str) -> Any:
        # The env's value when set (our config), else the task's; BrowserGym warns on every
        # override, which we make on purpose, so no warning here.
        value = getattr(self, name)
        return getattr(self.task, name) if value is None else value

