"""A self-contained HTML page per sampled group: what each episode saw and did.

Screenshots are inlined as base64 PNG, so the page opens from the run folder with no server and
can be copied anywhere. Per episode: status (and failure reason), return, goal; per step: the
screenshot the model saw, the raw completion, the parsed action (marked when it was the fallback),
the reward, the env's action error, policy version and timings. Each page links back to the run's
index page (`runs/<run>/index.html`, cluster/run_index.py), which lists and filters every group.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from core.trajectory import TrajectoryGroup

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.6em;border-top:1px solid #ccc;padding-top:.6em}
.finished{color:#186a1f}.truncated{color:#8a6d00}.failed{color:#b00020}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;font-size:.9em}
img{max-width:320px;border:1px solid #aaa} code{background:#f4f4f4;padding:1px 3px;white-space:pre-wrap;word-break:break-all}
.err{color:#b00020}.fb{background:#ffe9a8}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _return_text(value: float | None) -> str:
    """A failed episode has no return (None): shown as "none", never as 0."""
    return "none" if value is None else f"{value:g}"


def render_group_html(group: TrajectoryGroup, index_href: str | None = None) -> str:
    """The page for one group as a string; `index_href` links back to the run's index page."""
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>group {_e(group.group_id)}: {_e(group.task)} seed {group.seed}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<p><a id='run-index' href='{_e(index_href)}'>&larr; run index</a></p>" if index_href else "",
        f"<h1>{_e(group.task)} &middot; seed {group.seed} &middot; group {_e(group.group_id)}</h1>",
    ]
    returns = ", ".join(_return_text(t.episode_return) for t in group.trajectories)
    out.append(f"<p>{len(group.trajectories)} episodes; returns: {_e(returns)}</p>")
    for t in group.trajectories:
        out.append(
            f"<h2>episode {_e(t.episode_id)} &middot; <span class='{_e(t.status)}'>{_e(t.status)}</span>"
            f" &middot; return {_return_text(t.episode_return)} &middot; {len(t.steps)} steps &middot; {t.wall_s:.1f}s"
            f" &middot; worker {_e(t.worker_id)}</h2>"
        )
        out.append(f"<p><b>Goal:</b> {_e(t.goal)}</p>")
        if t.failure_reason:
            out.append(f"<p class='err'><b>Failure:</b> {_e(t.failure_reason)}</p>")
        if not t.steps:
            continue
        out.append(
            "<table><tr><th>step</th><th>screenshot</th><th>completion</th><th>action</th>"
            "<th>reward</th><th>error</th><th>version / timings</th></tr>"
        )
        for s in t.steps:
            imgs = "".join(
                f"<img alt='step {s.index}' src='data:image/png;base64,{base64.b64encode(b).decode()}'>"
                for b in s.images
            ) or "(no image)"
            fb = " class='fb' title='parser fallback: no valid action in the completion'" if s.parse_fallback else ""
            out.append(
                f"<tr><td>{s.index}</td><td>{imgs}</td><td><code>{_e(s.completion_text)}</code></td>"
                f"<td{fb}><code>{_e(s.action)}</code>{' (fallback)' if s.parse_fallback else ''}</td>"
                f"<td>{s.reward:g}{' done' if s.done else ''}</td><td class='err'>{_e(s.action_error)}</td>"
                f"<td>v{s.policy_version}<br>engine {s.engine_s:.2f}s<br>env {s.env_s:.2f}s"
                f"<br>{len(s.completion_ids)} tok ({_e(s.finish_reason)})</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "".join(out)


def write_group_html(group: TrajectoryGroup, directory: str | os.PathLike) -> Path:
    """Writes `<directory>/group-<id>.html` atomically and returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"group-{group.group_id}.html"
    tmp = path.with_suffix(".html.tmp")
    # The run's index.html (cluster/run_index.py) is at runs/<run>/; pages are in runs/<run>/viewer/
    # or, for the evaluation worker (whose folder is runs/<run>/eval), runs/<run>/eval/viewer/.
    index_href = "../../index.html" if directory.parent.name == "eval" else "../index.html"
    tmp.write_text(render_group_html(group, index_href), encoding="utf-8")
    os.replace(tmp, path)
    return path
