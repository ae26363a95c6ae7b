"""The run index page, `runs/<run>/index.html`: where to look in a run of hundreds of groups.

    python -m cluster.run_index RUN_DIR     (re)write the index of a run, finished or still running

The driver rewrites it after every learner step and at the end of the run. One self-contained page
(no server, no scripts from the network): the configuration summary, the run's curves (inline SVG
drawn from metrics.jsonl, with links to the PNG plots once they exist), success per task over the
steps, and a table of every group (step trained at, task, seed, returns, policy versions, failures)
linking to its viewer page, filterable by task, outcome and kind (train / eval).

Beside it, `index.json` holds the same table as data and the group -> step map, so a resumed run
(whose driver only knows its own steps) keeps the steps of the groups trained before.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow.parquet as pq
import yaml

from core.trajectory import FAILED, TRAJECTORY_SCHEMA, TrajectoryGroup, table_to_groups
from cluster.metrics import read_metrics
from cluster.plots import PLOTS

log = logging.getLogger(__name__)

INDEX_HTML = "index.html"
INDEX_JSON = "index.json"

# outcome of a group (the filter's values): an infrastructure failure wins over the rewards
SOLVED, UNSOLVED = "solved", "unsolved"
OUTCOMES = (SOLVED, UNSOLVED, FAILED)

# The config fields worth a glance; the whole config.yaml is one click away.
_SUMMARY_FIELDS = [
    "model", "cluster.mode", "cluster.total_steps", "cluster.num_rollout_workers", "cluster.learner_num_ranks",
    "cluster.groups_per_step", "cluster.max_staleness", "cluster.weight_sync", "cluster.env_placement",
    "engine.backend", "grpo.num_generations", "grpo.loss_type", "grpo.beta", "learner.lr", "env.max_steps",
    "sampler.tasks",
]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.5em;border-top:1px solid #ccc;padding-top:.5em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:3px 6px;font-size:.88em;text-align:left}
th{background:#f3f3f3} .solved{color:#186a1f}.unsolved{color:#555}.failed{color:#b00020;font-weight:bold}
.charts{display:flex;flex-wrap:wrap;gap:12px} .chart{border:1px solid #ddd;padding:4px;display:inline-block}
.chart svg text{font-size:11px;fill:#333} .filters{margin:.5em 0} .filters label{margin-right:1.2em}
code{background:#f4f4f4;padding:1px 3px} pre{background:#f7f7f7;padding:.6em;max-height:30em;overflow:auto}
"""

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]

# Filters: show the rows whose data-* attributes match every select; count what is shown.
_FILTER_JS = """
function applyFilters(){
  const task=document.getElementById('f-task').value, outcome=document.getElementById('f-outcome').value,
        kind=document.getElementById('f-kind').value;
  let shown=0; const rows=document.querySelectorAll('#groups tbody tr');
  rows.forEach(r=>{const ok=(!task||r.dataset.task===task)&&(!outcome||r.dataset.outcome===outcome)
    &&(!kind||r.dataset.kind===kind); r.style.display=ok?'':'none'; if(ok) shown++;});
  document.getElementById('shown').textContent=shown+' of '+rows.length+' groups shown';
}
document.querySelectorAll('.filters select').forEach(s=>s.addEventListener('change',applyFilters));
applyFilters();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def group_row(group: TrajectoryGroup, kind: str, viewer_page: str) -> dict[str, Any]:
    """One line of the groups table (also what index.json stores)."""
    failed = [t for t in group.trajectories if t.status == FAILED]
    versions = [v for t in group.trajectories for v in t.policy_versions]
    if failed:
        outcome = FAILED
    else:
        outcome = SOLVED if any(t.success for t in group.trajectories) else UNSOLVED
    return {
        "group_id": group.group_id,
        "kind": kind,
        "task": group.task,
        "seed": group.seed,
        "returns": [t.episode_return for t in group.trajectories],
        "successes": sum(t.success for t in group.trajectories),
        "episodes": len(group.trajectories),
        "min_version": min(versions) if versions else None,
        "max_version": max(versions) if versions else None,
        "failures": len(failed),
        "failure_reasons": sorted({t.failure_reason for t in failed if t.failure_reason}),
        "outcome": outcome,
        "viewer": viewer_page,
    }


class RunIndex:
    """Keeps `run_dir/index.html` current. Each Parquet group file is read once (cached by name)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._rows: dict[str, dict[str, Any]] = {}  # "kind/file name" -> row
        self.group_steps: dict[str, int] = {}
        """group_id -> the learner step that trained it (loaded from index.json on resume)."""
        try:
            saved = json.loads((self.run_dir / INDEX_JSON).read_text(encoding="utf-8"))
            self.group_steps = {str(k): int(v) for k, v in saved.get("group_steps", {}).items()}
        except (OSError, ValueError, AttributeError):
            pass

    def update(self, group_steps: Mapping[str, int] | None = None) -> Path | None:
        """Adds the group -> step pairs, reads new group files and rewrites the page. An index that
        cannot be written is logged, not raised: it must never stop a training run."""
        try:
            return self._update(group_steps or {})
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("run index of %s not written: %s", self.run_dir, e)
            return None

    def _update(self, group_steps: Mapping[str, int]) -> Path:
        self.group_steps.update({str(k): int(v) for k, v in group_steps.items()})
        for kind, base in (("train", self.run_dir), ("eval", self.run_dir / "eval")):
            for f in sorted((base / "trajectories").glob("group-*.parquet")):
                key = f"{kind}/{f.name}"
                if key in self._rows:
                    continue
                for g in table_to_groups(pq.read_table(f, schema=TRAJECTORY_SCHEMA)):
                    page = base / "viewer" / f"group-{g.group_id}.html"
                    self._rows[key] = group_row(g, kind, page.relative_to(self.run_dir).as_posix())
        rows = sorted(
            ({**r, "step": self.group_steps.get(r["group_id"]) if r["kind"] == "train" else None}
             for r in self._rows.values()),
            key=lambda r: (r["kind"] != "train", r["step"] is None, r["step"] or 0, r["task"], r["seed"]),
        )
        _write_atomic(self.run_dir / INDEX_JSON, json.dumps({"group_steps": self.group_steps, "groups": rows}, indent=1))
        page = render_index(self.run_dir, rows)
        return _write_atomic(self.run_dir / INDEX_HTML, page)


def render_index(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    """The page as a string, from the run folder's files and the group rows."""
    config = _load_yaml(run_dir / "config.yaml")
    summary = _load_json(run_dir / "summary.json")
    metrics = [r for r in read_metrics(run_dir) if "event" not in r and "step" in r]
    evals = [r for r in read_metrics(run_dir) if r.get("event") == "eval"]
    name = (config.get("cluster") or {}).get("run_name") or run_dir.name
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>run {_e(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>run {_e(name)}</h1>",
        f"<p>{len(metrics)} learner steps logged"
        + (f" of {_e(_get(config, 'cluster.total_steps'))}" if _get(config, "cluster.total_steps") is not None else "")
        + f"; {sum(r['kind'] == 'train' for r in rows)} training groups, {sum(r['kind'] == 'eval' for r in rows)} eval"
        f" groups; {'finished' if summary else 'running (this page is rewritten after every step)'}.</p>",
    ]

    out += _configuration_section(run_dir, config, summary)
    out += _curves_section(run_dir, metrics, evals)
    out += _per_task_section(rows)
    out += _groups_section(rows)
    out.append(f"<script>{_FILTER_JS}</script></body></html>")
    return "".join(out)


def _configuration_section(run_dir: Path, config: dict, summary: dict) -> list[str]:
    """The run's main settings, its episode accounting once finished, and the whole config.yaml."""
    out: list[str] = []
    out.append("<h2>Configuration</h2><table>")
    for field in _SUMMARY_FIELDS:
        value = _get(config, field)
        if value is not None:
            out.append(f"<tr><th>{_e(field)}</th><td>{_e(value)}</td></tr>")
    out.append("</table>" if config else "<tr><td>no config.yaml in the run folder</td></tr></table>")
    if summary:
        acc = summary.get("accounting", {})
        out.append(f"<p>Episodes: started {_e(acc.get('started'))}, trained {_e(acc.get('trained'))}, dropped "
                   f"{_e(acc.get('dropped'))}; accounting balanced: {_e(acc.get('balanced'))}.</p>")
    if (run_dir / "config.yaml").is_file():
        text = (run_dir / "config.yaml").read_text(encoding="utf-8")
        out.append(f"<details><summary>config.yaml (every field)</summary><pre>{_e(text)}</pre></details>")
    return out


def _curves_section(run_dir: Path, metrics: list[dict], evals: list[dict]) -> list[str]:
    """One inline chart per PLOTS entry that has points, linked to its PNG when one was drawn."""
    out: list[str] = []
    out.append("<h2>Curves</h2><div class='charts'>")
    for file_name, (title, ylabel, series) in PLOTS.items():
        lines = {label: [(r["step"], r[key]) for r in metrics + evals if _is_number(r.get(key))] for key, label in series}
        lines = {k: v for k, v in lines.items() if v}
        if lines:
            link = f" (<a href='{_e(file_name)}'>PNG</a>)" if (run_dir / file_name).is_file() else ""
            out.append(f"<div class='chart' id='chart-{_e(file_name[:-4])}'><b>{_e(title)}</b>{link}<br>"
                       f"{_svg_chart(lines, ylabel)}</div>")
    out.append("</div>" if metrics else "<p>No learner step logged yet.</p></div>")
    return out


def _per_task_section(rows: list[dict[str, Any]]) -> list[str]:
    """Each task's success rate over the learner steps that trained its groups (failed groups,
    never trained, left out), as a chart and a table."""
    out: list[str] = []
    out.append("<h2>Success per task over steps</h2>")
    per_task: dict[str, dict[int, list[int]]] = {}
    for r in rows:
        if r["kind"] == "train" and r["step"] is not None and r["outcome"] != FAILED:
            cell = per_task.setdefault(r["task"], {}).setdefault(r["step"], [0, 0])
            cell[0] += r["successes"]
            cell[1] += r["episodes"]
    if per_task:
        lines = {task: sorted((s, c[0] / c[1]) for s, c in by_step.items() if c[1]) for task, by_step in per_task.items()}
        out.append(f"<div class='chart' id='chart-per-task'>{_svg_chart(lines, 'success rate', y_range=(0.0, 1.0))}</div>")
        steps = sorted({s for by_step in per_task.values() for s in by_step})
        out.append("<table id='per-task'><tr><th>task</th>" + "".join(f"<th>{s}</th>" for s in steps) + "</tr>")
        for task, by_step in sorted(per_task.items()):
            cells = "".join(
                f"<td>{by_step[s][0]}/{by_step[s][1]}</td>" if s in by_step else "<td></td>" for s in steps
            )
            out.append(f"<tr><td>{_e(task)}</td>{cells}</tr>")
        out.append("</table><p>successes / trained episodes of the groups trained at each step.</p>")
    else:
        out.append("<p>No trained group yet.</p>")
    return out


def _groups_section(rows: list[dict[str, Any]]) -> list[str]:
    """Every group as a row, filterable by task, outcome and kind, linking to its viewer page."""
    out: list[str] = []
    out.append("<h2>Groups</h2><div class='filters'>")
    for select_id, label, values in (
        ("f-task", "task", sorted({r["task"] for r in rows})),
        ("f-outcome", "outcome", list(OUTCOMES)),
        ("f-kind", "kind", ["train", "eval"]),
    ):
        options = "".join(f"<option value='{_e(v)}'>{_e(v)}</option>" for v in values)
        out.append(f"<label>{label} <select id='{select_id}'><option value=''>all</option>{options}</select></label>")
    out.append("<span id='shown'></span></div>")
    out.append(
        "<table id='groups'><thead><tr><th>step</th><th>kind</th><th>task</th><th>seed</th><th>returns</th>"
        "<th>outcome</th><th>policy version</th><th>failures</th><th>group</th></tr></thead><tbody>"
    )
    for r in rows:
        versions = "" if r["min_version"] is None else (
            f"v{r['min_version']}" if r["min_version"] == r["max_version"] else f"v{r['min_version']}-v{r['max_version']}")
        failures = f"{r['failures']}: {'; '.join(r['failure_reasons'])}" if r["failures"] else "0"
        out.append(
            f"<tr data-task='{_e(r['task'])}' data-outcome='{_e(r['outcome'])}' data-kind='{_e(r['kind'])}'>"
            f"<td>{'' if r['step'] is None else r['step']}</td><td>{_e(r['kind'])}</td><td>{_e(r['task'])}</td>"
            f"<td>{r['seed']}</td><td>{_e(', '.join('none' if x is None else f'{x:g}' for x in r['returns']))}</td>"
            f"<td class='{_e(r['outcome'])}'>{_e(r['outcome'])}</td><td>{versions}</td><td>{_e(failures)}</td>"
            f"<td><a href='{_e(r['viewer'])}'>{_e(r['group_id'])}</a></td></tr>"
        )
    out.append("</tbody></table>")
    return out


def _svg_chart(
    lines: Mapping[str, Iterable[tuple[float, float]]], ylabel: str, y_range: tuple[float, float] | None = None,
    width: int = 420, height: int = 220,
) -> str:
    """A small line chart as inline SVG: one polyline (and dots) per series, axes, a legend."""
    series = {k: sorted(v) for k, v in lines.items()}
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range else (min(0.0, min(ys)), max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    left, right, top, bottom = 48, 10, 10, 30 + 14 * len(series)
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
           f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>",
           f"<text x='4' y='{top + 10}'>{_e(f'{y1:.3g}')}</text><text x='4' y='{top + ph}'>{_e(f'{y0:.3g}')}</text>",
           f"<text x='{left}' y='{top + ph + 14}'>step {x0:g}</text>",
           f"<text x='{left + pw}' y='{top + ph + 14}' text-anchor='end'>{x1:g}</text>",
           f"<text x='{left + pw / 2}' y='{top + ph + 14}' text-anchor='middle'>{_e(ylabel)}</text>"]
    for i, (label, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{coords}'/>")
        out.extend(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='2.5' fill='{color}'/>" for x, y in pts)
        ly = top + ph + 28 + 14 * i
        out.append(f"<rect x='{left}' y='{ly - 8}' width='10' height='3' fill='{color}'/>"
                   f"<text x='{left + 14}' y='{ly}'>{_e(label)}</text>")
    out.append("</svg>")
    return "".join(out)


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.run_index", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (runs/<run>)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "trajectories").is_dir():
        print(f"{run_dir}: not a run folder (no config.yaml, no trajectories/)")
        return 2
    # The group -> step map of a finished run: summary.json has every step's groups.
    summary = _load_json(run_dir / "summary.json")
    steps = {gid: int(s["step"]) for s in summary.get("trained_steps", []) for gid in s.get("group_ids", [])}
    path = RunIndex(run_dir)._update(steps)  # errors shown, not logged: a person is watching
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
