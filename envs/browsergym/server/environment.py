"""BrowserGym MiniWoB as an openenv-core `Environment`.

One instance = one WebSocket session = one BrowserGym env. With `reset_mode="page"` (the default)
or `"context"` the session keeps one Chromium for all its episodes (server/browser.py): "context"
gives each episode a fresh browser context, "page" keeps the page across MiniWoB episodes (an
in-page restart, or a navigation to another task). With `"relaunch"` BrowserGym's own reset
relaunches Chromium and its chat-window Chromium every episode. BrowserGym's sync Playwright is bound to the thread that created it, so the
server runs every session of a process on one thread (REQUIRES_SINGLE_THREAD_EXECUTOR) and we
check that nobody calls us from another thread.
"""

from __future__ import annotations

import base64
import importlib
import io
import logging
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

from openenv.core.env_server.interfaces import Environment

from envs.browsergym.actions import ActionValidator
from envs.browsergym.chromium import install_cheap_call_stacks, install_launch_wrapper
from envs.browsergym.config import EnvConfig, qualify_task_name, reset_seed
from envs.browsergym.models import BrowserGymAction, BrowserGymObservation, BrowserGymState

logger = logging.getLogger(__name__)

ELEMENT_TEXT_CHARS = 80
LAST_ACTION_CHARS = 200


class _DropOverrideWarnings(logging.Filter):
    # BrowserGym warns on every reset that we override slow_mo/viewport: we do so on purpose.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Overriding the task's" not in record.getMessage()


logging.getLogger("browsergym.core.env").addFilter(_DropOverrideWarnings())


def default_miniwob_url() -> str:
    """`file://` URL (trailing slash) of the MiniWoB pages shipped in the `miniwob` package."""
    import miniwob

    folder = Path(miniwob.__file__).resolve().parent / "html" / "miniwob"
    if not (folder / "click-test.html").is_file():
        raise RuntimeError(f"the miniwob package has no task pages in {folder}")
    return folder.as_uri() + "/"


def _printable(text: str, limit: int) -> str:
    # Untrusted text (the model's action) must survive JSON encoding: no lone surrogates.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text)} chars]"


def png_base64(screenshot: Any) -> str:
    """uint8 HxWx3 array -> base64 PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(screenshot).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def dom_element_texts(dom_snapshot: dict) -> dict[str, tuple[str, str]]:
    """bid -> (tag, text content) from a CDP DOMSnapshot (BrowserGym's `dom_object`).

    Some MiniWoB targets (click-link's `<span class="alink">`) have a bid in the DOM but no node in
    the accessibility tree, so the element list takes tag and text from the DOM.
    """
    strings = dom_snapshot.get("strings", [])

    def to_string(index: int) -> str:
        return strings[index] if 0 <= index < len(strings) else ""

    result: dict[str, tuple[str, str]] = {}
    for document in dom_snapshot.get("documents", []):
        nodes = document["nodes"]
        parents = nodes["parentIndex"]
        node_types = nodes["nodeType"]
        count = len(parents)
        # Collect text nodes' values into every ancestor (documents are small; depth is bounded).
        texts: list[list[str]] = [[] for _ in range(count)]
        for index in range(count):
            if node_types[index] == 3:
                value = to_string(nodes["nodeValue"][index]).strip()
                if value:
                    parent = parents[index]
                    while parent != -1:
                        texts[parent].append(value)
                        parent = parents[parent]
        for index in range(count):
            if node_types[index] != 1:
                continue
            attributes = nodes["attributes"][index]
            for k in range(0, len(attributes) - 1, 2):
                if to_string(attributes[k]) == "bid":
                    bid = to_string(attributes[k + 1])
                    tag = to_string(nodes["nodeName"][index]).lower()
                    result[bid] = (tag, " ".join(texts[index])[:ELEMENT_TEXT_CHARS])
                    break
    return result


def clickable_elements(obs: dict) -> list[dict[str, Any]]:
    """Visible clickable elements with bid, role, tag, text and bbox [x, y, w, h] (CSS px)."""
    roles: dict[str, tuple[str, str]] = {}
    for node in (obs.get("axtree_object") or {}).get("nodes", []):
        bid = node.get("browsergym_id")
        if bid is not None:
            role = (node.get("role") or {}).get("value", "")
            name = (node.get("name") or {}).get("value", "")
            roles[str(bid)] = (str(role), str(name))
    dom = dom_element_texts(obs.get("dom_object") or {})
    elements = []
    for bid, props in (obs.get("extra_element_properties") or {}).items():
        bbox = props.get("bbox")
        if not props.get("clickable") or bbox is None or (props.get("visibility") or 0) < 0.5:
            continue
        role, name = roles.get(bid, ("", ""))
        tag, dom_text = dom.get(bid, ("", ""))
        elements.append(
            {
                "bid": str(bid),
                "role": role or tag,
                "tag": tag,
                "text": (name or dom_text)[:ELEMENT_TEXT_CHARS],
                "bbox": [round(float(v), 1) for v in bbox],
            }
        )
    return elements


def goal_text(obs: dict) -> str:
    """The goal as plain text (BrowserGym's legacy `goal`, else the text parts of `goal_object`)."""
    if obs.get("goal"):
        return str(obs["goal"])
    parts = [m.get("text", "") for m in obs.get("goal_object") or [] if m.get("type") == "text"]
    return " ".join(p for p in parts if p)


class BrowserGymEnvironment(Environment[BrowserGymAction, BrowserGymObservation, BrowserGymState]):
    """A BrowserGym task behind OpenEnv's reset/step/state."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # each session has its own browsers
    REQUIRES_SINGLE_THREAD_EXECUTOR = True  # ...but all of them on the one Playwright thread

    def __init__(self, config: Optional[EnvConfig] = None):
        super().__init__()
        self.config = (config or EnvConfig()).validate()
        self.validator = ActionValidator(
            self.config.action_subsets, self.config.max_action_chars, self.config.allow_multiaction
        )
        self._gym_env: Any = None
        self._kept_browser: Any = None  # KeptBrowser ("page"/"context" modes), made at the first reset
        self._gym_task: Optional[str] = None
        self._thread_id: Optional[int] = None
        self._episode_done = True
        self._started = False
        self._state = BrowserGymState(max_steps=self.config.max_steps)

    # --- OpenEnv interface ---

    def reset(
        self,
        seed: Optional[int] = None,
        episode_id: Optional[str] = None,
        task: Optional[str] = None,
        task_name: Optional[str] = None,  # upstream OpenEnv's name for the same thing
        **kwargs: Any,
    ) -> BrowserGymObservation:
        """Start an episode of `task` (default: the configured one) with `seed` (random if None)."""
        seed = reset_seed(seed, kwargs)
        self._check_thread()
        qualified = qualify_task_name(task or task_name or self.config.task)

        # --- a BrowserGym env for the task when it changes ---
        if qualified != self._gym_task:
            self._switch_gym_env(qualified)

        # --- start the episode (a fresh context on the kept browser, or BrowserGym's relaunch) ---
        self._episode_done = True  # stays so if the reset fails
        try:
            obs, info = self._gym_env.reset(seed=seed)
        except Exception as e:
            # A half-started BrowserGym env cannot be reset again: drop it (and the kept browser,
            # which may be the culprit); the next reset rebuilds both.
            self._close_gym_env()
            self._close_kept_browser()
            raise RuntimeError(f"browser failure during reset of {qualified}: {type(e).__name__}: {e}") from e
        self._started = True
        self._episode_done = False
        self._state = BrowserGymState(
            episode_id=episode_id or str(uuid.uuid4()),
            step_count=0,
            benchmark=qualified.split(".", 1)[0],
            task_name=qualified,
            goal=goal_text(obs),
            current_url=str(obs.get("url", "")),
            max_steps=self.config.max_steps,
            cum_reward=0.0,
            seed=seed,
            done=False,
        )
        observation = self._observation(obs, info, reward=0.0, terminated=False, truncated=False)
        observation.browser_recycled = self._kept_browser is not None and self._kept_browser.recycled_now
        return observation

    def step(
        self, action: BrowserGymAction, timeout_s: Optional[float] = None, **kwargs: Any
    ) -> BrowserGymObservation:
        """Validate and run one action. A bad action is a recorded error, never an exception."""
        self._check_thread()
        if not self._started or self._episode_done:
            reason = "call reset() before step()" if not self._started else "episode is over; call reset()"
            return BrowserGymObservation(
                goal=self._state.goal,
                url=self._state.current_url,
                error=reason,
                last_action_error=True,
                done=self._started,
                reward=0.0,
                step_count=self._state.step_count,
                task_name=self._state.task_name,
                seed=self._state.seed,
            )

        # The validator is BrowserEnv's action_mapping: its InvalidActionError becomes
        # obs["last_action_error"] inside BrowserGym's step, and the page is observed as usual.
        try:
            obs, reward, terminated, truncated, info = self._gym_env.step(action.action_str)
        except Exception as e:
            # Action errors are caught inside BrowserGym; reaching here means the browser itself
            # failed (crash, closed page): an infrastructure error for the client, not a reward.
            self._close_gym_env()
            self._close_kept_browser()
            raise RuntimeError(f"browser failure during step: {type(e).__name__}: {e}") from e
        self._state.step_count += 1
        truncated = bool(truncated) or (not terminated and self._state.step_count >= self.config.max_steps)
        self._episode_done = bool(terminated) or truncated
        self._state.cum_reward += float(reward)
        self._state.current_url = str(obs.get("url", ""))
        self._state.done = self._episode_done
        return self._observation(obs, info, reward=float(reward), terminated=bool(terminated), truncated=truncated)

    @property
    def state(self) -> BrowserGymState:
        # Read on the server's event-loop thread: must not touch Playwright.
        return self._state

    def close(self) -> None:
        """Close the browsers (must run on the Playwright thread; the server does that)."""
        self._close_gym_env()
        self._close_kept_browser()

    def browser_stats(self) -> dict[str, Any]:
        """Launches, recycles and memory of the session's kept browser ("page"/"context" modes)."""
        kept = self._kept_browser
        if kept is None:
            return {"browser_launches": 0, "browser_recycles": 0, "browser_memory_mb": 0.0}
        return {"browser_launches": kept.launches, "browser_recycles": kept.recycles,
                "browser_memory_mb": round(kept.memory_mb(), 1)}

    # --- helpers ---

    def _check_thread(self) -> None:
        current = threading.get_ident()
        if self._thread_id is None:
            self._thread_id = current
        elif self._thread_id != current:
            raise RuntimeError(
                "BrowserGymEnvironment used from two threads; BrowserGym's sync Playwright is bound "
                "to the thread that created it. The usual cause: the session sat idle longer than the "
                f"server's env.session_timeout_s ({self.config.session_timeout_s} s), openenv closed it, "
                "and runs later calls on another thread; reconnect, or raise or unset the timeout"
            )

    def _switch_gym_env(self, task: str) -> None:
        """The env for `task`. A kept-browser env of the same benchmark only changes its task, so
        its open page stays for the next reset (reset_mode="page" loads the new MiniWoB task into
        it); anything else is closed and built anew."""
        registered, env_kwargs = self._registered_env(task)  # validates the task; launches nothing
        same_benchmark = self._gym_task is not None and self._gym_task.split(".", 1)[0] == task.split(".", 1)[0]
        if same_benchmark and hasattr(self._gym_env, "switch_task"):
            self._gym_env.switch_task(registered.task_entrypoint)
        else:
            self._close_gym_env()
            self._gym_env = self._kept_browser_env(registered, env_kwargs)
        self._gym_task = task

    def _registered_env(self, task: str) -> tuple[Any, dict[str, Any]]:
        """BrowserGym's registered env for `task` (gym.make launches nothing) and the kwargs it was
        made with; a clear error for an unknown benchmark or task."""
        import gymnasium as gym

        benchmark = task.split(".", 1)[0]
        if benchmark == "recorded":
            raise ValueError(f"{task} is browser-free: it is served by an env server started with a "
                             "recorded task (--task recorded.click-button), not by a BrowserGym one")
        try:
            importlib.import_module(f"browsergym.{benchmark}")  # registers its tasks with gym
        except ModuleNotFoundError:
            raise ValueError(f"unknown benchmark {benchmark!r} in task {task!r} (install browsergym-{benchmark})") from None
        env_id = f"browsergym/{task}"
        if env_id not in gym.registry:
            known = sorted(k[len("browsergym/") :] for k in gym.registry if k.startswith(f"browsergym/{benchmark}."))
            raise ValueError(f"unknown task {task!r}; {len(known)} {benchmark} tasks exist, e.g. {', '.join(known[:5])}")

        install_launch_wrapper(self.config.chromium_path, self.config.chromium_args)
        install_cheap_call_stacks()
        task_kwargs: dict[str, Any] = {}
        if benchmark == "miniwob":
            task_kwargs["base_url"] = self.config.miniwob_url or default_miniwob_url()
        env_kwargs = dict(
            task_kwargs=task_kwargs,
            headless=self.config.headless,
            slow_mo=self.config.slow_mo,
            timeout=self.config.action_timeout_ms,
            viewport=self.config.viewport,
            pre_observation_delay=self.config.pre_observation_delay,
            action_mapping=self.validator,
        )
        env = gym.make(env_id, disable_env_checker=True, **env_kwargs).unwrapped  # BrowserEnv, no gym wrappers
        return env, env_kwargs

    def _kept_browser_env(self, registered: Any, env_kwargs: dict[str, Any]) -> Any:
        """The env episodes run on: the registered env itself for reset_mode="relaunch", else a
        `PersistentBrowserEnv` of its task on the session's kept browser."""
        if self.config.reset_mode == "relaunch":
            return registered
        from envs.browsergym.server.browser import KeptBrowser, PersistentBrowserEnv

        if self._kept_browser is None:
            self._kept_browser = KeptBrowser(
                self.config.headless, self.config.browser_max_episodes, self.config.browser_max_memory_mb
            )
        # The registered env only holds the task's entry point (gym.make launches nothing).
        return PersistentBrowserEnv(registered.task_entrypoint, self._kept_browser,
                                    in_page_restart=self.config.reset_mode == "page",
                                    capture_screenshot=self.config.include_screenshot
                                    or self.config.include_screenshot_array,
                                    **env_kwargs)

    def _close_kept_browser(self) -> None:
        if self._kept_browser is not None:
            self._kept_browser.close()  # counters stay; the next reset launches a new one

    def _close_gym_env(self) -> None:
        if self._gym_env is None:
            return
        env, self._gym_env, self._gym_task = self._gym_env, None, None
        self._started, self._episode_done = False, True
        try:
            env.close()
        except Exception as e:  # a dead browser must not stop us from closing the rest
            logger.warning("closing BrowserGym env failed: %s: %s", type(e).__name__, e)

    def _observation(
        self, obs: dict, info: dict, reward: float, terminated: bool, truncated: bool
    ) -> BrowserGymObservation:
        from browsergym.utils.obs import flatten_axtree_to_str, flatten_dom_to_str, prune_html

        config = self.config
        axtree_txt = flatten_axtree_to_str(obs["axtree_object"]) if obs.get("axtree_object") else ""
        pruned_html = ""
        if config.include_pruned_html and obs.get("dom_object"):
            pruned_html = prune_html(flatten_dom_to_str(obs["dom_object"]))
        screenshot = obs.get("screenshot")
        error = str(obs.get("last_action_error") or "")
        task_info = info.get("task_info") if isinstance(info, dict) else None
        return BrowserGymObservation(
            text=axtree_txt,
            url=str(obs.get("url", "")),
            screenshot=screenshot.tolist() if config.include_screenshot_array and screenshot is not None else None,
            goal=goal_text(obs),
            axtree_txt=axtree_txt,
            pruned_html=pruned_html,
            error=_printable(error, 2000),
            last_action_error=bool(error),
            done=terminated or truncated,
            reward=reward,
            # openenv 0.3.0's serializer drops metadata on the wire; in-process users still get it.
            metadata={"task_info": _jsonable(task_info), "elapsed_time": _jsonable(obs.get("elapsed_time"))},
            screenshot_png_b64=png_base64(screenshot) if config.include_screenshot and screenshot is not None else "",
            clickable_elements=clickable_elements(obs),
            step_count=self._state.step_count,
            task_name=self._gym_task or "",
            seed=self._state.seed,
            terminated=terminated,
            truncated=truncated,
            last_action=_printable(str(obs.get("last_action") or ""), LAST_ACTION_CHARS),
        )


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)
