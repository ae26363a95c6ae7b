"""What a run leaves for the people watching it: the trackers' files, the Ray metrics behind the
Grafana dashboard, and the run index page, all from ONE short real training run (module-scoped).

The run: the `local` preset (2 rollout workers, the tiny offline Qwen3-VL, transformers engines, the
learner, Ray metrics on the session's cluster) on the browser-free `recorded.click-button` env, 3
sync steps, trackio + TensorBoard + wandb (offline) all on, a greedy evaluation at step 2. Then:
each tracker's own files are read back with the tracker's reader; the live Prometheus endpoint is
scraped for every metric the dashboard queries; the index page is opened in real headless Chromium.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import threading
import time
from pathlib import Path

import pytest
import requests

from cluster import config as C
from cluster import driver
from cluster.grafana import make_dashboard
from cluster.metrics import read_metrics

RUN_NAME = "outputs-test"
STEPS = 3
# Figures logged at every step whose values differ from step to step or are exact counts: a tracker
# that dropped a step, shifted the steps or mixed up names would fail the comparison.
CHECKED = ["policy_version", "episodes_trained", "trained_tokens", "env_steps", "reward_mean", "groups_trained"]


@pytest.fixture(scope="module")
def outputs_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    run_dir = root / "run"
    saved_env = {k: os.environ.get(k) for k in ("TRACKIO_DIR", "WANDB_MODE", "WANDB_SILENT")}
    # trackio reads TRACKIO_DIR when first imported, and its modules copy the value
    # (`from trackio.utils import TRACKIO_DIR`). TRL's GRPOTrainer imports trackio, so after
    # tests/test_grpo_loss.py it is already imported in this process and the variable alone would
    # send the run to ~/.cache (seen in CI: an empty database here). Rebind the copies too.
    # wandb stays offline by default (cluster/metrics.py) and writes under run_dir/wandb.
    os.environ["TRACKIO_DIR"] = str(root / "trackio")
    saved_trackio = _point_imported_trackio_at(root / "trackio")
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_MODE", None)
    from tests.test_e2e import SMOKE  # the local preset's old smoke settings: tiny VLM, no warm start

    cfg = C.build_config("local", {
        **SMOKE,
        "cluster.run_dir": str(run_dir), "cluster.run_name": RUN_NAME, "cluster.total_steps": str(STEPS),
        "model": "tiny-vlm", "sampler.tasks": "[recorded.click-button]", "env.task": "recorded.click-button",
        "logging.progress_bar": "false", "logging.trackers": "[trackio, tensorboard, wandb]",
        "eval.at_end": "false", "eval.every_steps": "2", "eval.episodes_per_task": "1",
    }, environ={})
    C.validate_config(cfg)
    scraped: dict[str, str] = {}
    dashboard_metrics = {m for _, expr in _dashboard_queries() for m in _metric_names(expr)}

    def at_last_step(trainer, step):
        # Every figure has been recorded by now (the evaluation ran at step 2). Ray exports every
        # few seconds: wait until every metric the dashboard names is on the endpoint (<= 60 s).
        if step != STEPS:
            return
        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            text = _scrape()
            if dashboard_metrics <= _exported_names(text, RUN_NAME):
                break
            time.sleep(2)
        scraped["text"] = text

    try:
        summary = driver.train(cfg, run_dir, on_step=at_last_step)
    finally:
        for module, value in saved_trackio:
            module.TRACKIO_DIR = value
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rows = {r["step"]: r for r in read_metrics(run_dir) if "policy_version" in r and "event" not in r}
    assert sorted(rows) == list(range(1, STEPS + 1))
    return {"summary": summary, "run_dir": run_dir, "rows": rows, "trackio_dir": root / "trackio",
            "metrics_text": scraped.get("text", "")}


def _point_imported_trackio_at(directory: Path) -> list[tuple[object, object]]:
    """Rebinds TRACKIO_DIR in every already-imported trackio module; returns what to restore."""
    import sys

    saved = []
    for name, module in list(sys.modules.items()):
        if (name == "trackio" or name.startswith("trackio.")) and hasattr(module, "TRACKIO_DIR"):
            saved.append((module, module.TRACKIO_DIR))
            module.TRACKIO_DIR = Path(directory)
    return saved


def _expected(outputs_run) -> dict[str, dict[int, float]]:
    return {k: {s: float(r[k]) for s, r in outputs_run["rows"].items()} for k in CHECKED}


def _assert_series(read: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], tracker: str) -> None:
    for key, by_step in expected.items():
        assert key in read, f"{tracker}: no {key!r} among {sorted(read)[:20]}..."
        assert set(read[key]) == set(by_step), f"{tracker} {key}: steps {sorted(read[key])} != {sorted(by_step)}"
        for step, value in by_step.items():
            assert read[key][step] == pytest.approx(value, rel=1e-5), (tracker, key, step)
    # versions move one per step in a sync run: the steps are the learner's, not a counter of calls
    assert read["policy_version"] == {s: float(s) for s in range(1, STEPS + 1)}


def test_training_run_on_the_recorded_env(outputs_run):
    """The local preset's whole loop (2 Ray rollout workers, env servers as subprocesses, the
    tiny VLM, the learner) on the recorded page: every step trains and every worker ends on the
    learner's version. (It had its own 2-step run in tests/test_recorded_env.py; this module's run
    is the same loop with trackers on, so one run serves both.)"""
    summary = outputs_run["summary"]
    assert summary["steps"] == STEPS and summary["learner_version"] == STEPS
    assert summary["worker_versions"] == [STEPS, STEPS]
    acc = summary["accounting"]
    assert acc["balanced"] and acc["trained"] > 0, acc


# --- trackers ----------------------------------------------------------------------------------------


def test_tensorboard_event_file_has_the_scalars_at_the_steps(outputs_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(outputs_run["run_dir"] / "tensorboard"))
    acc.Reload()
    read = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    _assert_series(read, _expected(outputs_run), "tensorboard")
    assert {"learner/loss", "eval_success_rate"} <= set(read)


def test_trackio_database_has_the_scalars_at_the_steps(outputs_run):
    # trackio keeps one SQLite database per project under TRACKIO_DIR; read it with trackio's own
    # storage class (in a subprocess: the module fixes its directory at import).
    import subprocess
    import sys

    code = (
        "import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
        f"print(json.dumps({{'runs': S.get_runs('bgrpo'), 'logs': S.get_logs('bgrpo', {RUN_NAME!r})}}, default=str))"
    )
    env = {**os.environ, "TRACKIO_DIR": str(outputs_run["trackio_dir"])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert RUN_NAME in data["runs"]
    read: dict[str, dict[int, float]] = {}
    for row in data["logs"]:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step" and v is not None:
                read.setdefault(k, {})[int(row["step"])] = float(v)
    _assert_series(read, _expected(outputs_run), "trackio")


def test_wandb_offline_run_file_has_the_scalars_at_the_steps(outputs_run):
    from wandb.proto import wandb_internal_pb2

    files = list((outputs_run["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # offline: nothing was sent anywhere, all of it is in this file
    read: dict[str, dict[int, float]] = {}
    for raw in _wandb_records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        step = record.history.step.num
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            value = json.loads(item.value_json)
            if isinstance(value, (int, float)) and not key.startswith("_"):
                read.setdefault(key, {})[step] = float(value)
    _assert_series(read, _expected(outputs_run), "wandb")


def _wandb_records(path: Path):
    """The records of a .wandb file: wandb's LevelDB-style log (a 7-byte file header ':W&B', magic,
    version; then 32 KiB blocks of records, each with a 7-byte header crc32 / length / type, split
    across blocks as FIRST, MIDDLE, LAST). wandb 0.31 has no Python reader for it any more."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk


# --- the Grafana dashboard ----------------------------------------------------------------------------


def _dashboard_queries() -> list[tuple[str, str]]:
    return make_dashboard.panel_queries(json.loads(make_dashboard.DASHBOARD_JSON.read_text()))


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bray_bgrpo_[A-Za-z0-9_]+", expr))


def _scrape() -> str:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text


def _exported_names(text: str, run: str) -> set[str]:
    """Names of the samples of `run` on a Prometheus text page."""
    return {m.group(1) for m in re.finditer(r'^(ray_bgrpo_[A-Za-z0-9_]+)\{([^}]*)\}', text, re.M)
            if f'run="{run}"' in m.group(2)}


def test_dashboard_json_is_what_the_generator_makes():
    assert make_dashboard.main(["--check"]) == 0


def test_every_dashboard_query_names_a_metric_the_run_exported(outputs_run):
    text = outputs_run["metrics_text"]
    exported = _exported_names(text, RUN_NAME)
    queries = _dashboard_queries()
    assert len(queries) >= 12
    for title, expr in queries:
        names = _metric_names(expr)
        assert names, f"panel {title!r}: query names no bgrpo metric: {expr}"
        missing = names - exported
        assert not missing, f"panel {title!r} queries {sorted(missing)}, not on the live endpoint ({sorted(exported)})"
        # the labels the panels group and filter by are on those series
        for label in re.findall(r"\b(run|task)=~", expr):
            for name in names:
                assert re.search(rf'^{name}\{{[^}}]*\b{label}="', text, re.M), (title, name, label)
    # what the issue asks the dashboard to show
    named = {n for _, expr in queries for n in _metric_names(expr)}
    for name in ("ray_bgrpo_task_success_rate", "ray_bgrpo_task_reward_mean", "ray_bgrpo_episodes_trained_total",
                 "ray_bgrpo_policy_lag_max", "ray_bgrpo_weight_sync_s_sum", "ray_bgrpo_learner_step_s_bucket",
                 "ray_bgrpo_trained_tokens_total", "ray_bgrpo_env_failures_total", "ray_bgrpo_actor_failures_total",
                 "ray_bgrpo_engine_sleeps_total", "ray_bgrpo_eval_task_success_rate"):
        assert name in named, name
    # the per-task series carry the task of the run
    assert re.search(r'^ray_bgrpo_task_success_rate\{[^}]*task="recorded\.click-button"', text, re.M)


def test_dashboard_layout_is_rays():
    """Ray's own grid (24 wide, two 12-wide panels per row, rows of height 1), its datasource and
    SessionName variables, and a uid of its own so it sits beside Ray's dashboards."""
    dashboard = json.loads(make_dashboard.DASHBOARD_JSON.read_text())
    assert dashboard["uid"] == "bgrpoDashboard"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "SessionName", "run", "task", "window"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            assert panel["gridPos"]["w"] == 24 and panel["gridPos"]["h"] == 1
        else:
            assert panel["gridPos"]["w"] == 12 and panel["gridPos"]["x"] in (0, 12)
            assert panel["datasource"] == "${datasource}"
            assert all('SessionName=~"$SessionName"' in t["expr"] for t in panel["targets"])


# --- the run index page --------------------------------------------------------------------------------


def test_index_lists_every_group_with_its_step(outputs_run):
    run_dir, summary = outputs_run["run_dir"], outputs_run["summary"]
    index = json.loads((run_dir / "index.json").read_text())
    trained = {gid: s["step"] for s in summary["trained_steps"] for gid in s["group_ids"]}
    train_rows = [r for r in index["groups"] if r["kind"] == "train"]
    files = {p.name for p in (run_dir / "trajectories").glob("group-*.parquet")}
    assert {f"group-{r['group_id']}.parquet" for r in train_rows} == files
    assert {r["group_id"]: r["step"] for r in train_rows if r["step"] is not None} == trained
    assert len([r for r in index["groups"] if r["kind"] == "eval"]) == 1  # 1 task x 1 held-out seed
    html = (run_dir / "index.html").read_text()
    assert "running" not in html.split("</p>")[0]  # the final rewrite knows the run finished
    for name in ("reward.png", "success_rate.png"):
        assert f"href='{name}'" in html


def _in_fresh_thread(test):
    """Runs the test body on a new thread. Playwright's sync API refuses to start in a thread that
    already runs one (BrowserGym keeps a global sync Playwright in the test process once an
    in-process env test has used it: "using Playwright Sync API inside the asyncio loop", seen in
    the full suite), and a fresh thread has none."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        error: list[BaseException] = []

        def body():
            try:
                test(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the test's own thread
                error.append(exc)

        thread = threading.Thread(target=body, name=test.__name__)
        thread.start()
        thread.join()
        if error:
            raise error[0]

    return run


def _assert_chart_drawn(png, box) -> None:
    """The screenshot itself shows the page: taller than one screen (the groups table follows the
    charts), and inside the reward chart's box, pixels of the first series' colour (#1f77b4, the
    train curve and its points: frame and labels are grey), i.e. the curve was painted, not just
    present in the DOM."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    assert image.width == 1300 and image.height > 900, image.size
    assert box is not None and box["width"] > 50 and box["height"] > 50, box
    chart = image.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])))
    blue = sum(n for n, (r, g, b) in chart.getcolors(maxcolors=1 << 18) if b > r + 80 and b > g + 30)
    assert blue >= 30, blue  # a 1.5 px polyline across the chart, plus 2.5 px dots at each step


@pytest.mark.browser
@_in_fresh_thread
def test_index_page_in_chromium_links_resolve(outputs_run, tmp_path):
    run_dir = outputs_run["run_dir"]
    with _chromium() as browser:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((run_dir / "index.html").as_uri())
        assert page.title() == f"run {RUN_NAME}"
        assert page.locator("#groups tbody tr").count() == len(json.loads((run_dir / "index.json").read_text())["groups"])
        assert page.locator("#chart-reward svg polyline").count() >= 1
        assert page.locator("#chart-per-task svg polyline").count() == 1
        shot = tmp_path / "index.png"
        page.screenshot(path=str(shot), full_page=True)
        _assert_chart_drawn(shot, page.locator("#chart-reward svg").bounding_box())
        hrefs = page.eval_on_selector_all("a", "els => els.map(e => e.href)")
        assert len(hrefs) >= 7  # 6 training groups + 1 eval group + the PNG plots
        for href in hrefs:
            sub = browser.new_page()
            response = sub.goto(href)
            assert response is not None and response.ok, href
            if href.endswith(".html"):  # a group's viewer page, which links back to the index
                assert sub.locator("h1").count() == 1
                sub.click("#run-index")
                assert sub.url == (run_dir / "index.html").as_uri(), (href, sub.url)
            sub.close()
        assert not errors, errors


# --- the index filters, on groups made to cover every outcome --------------------------------------------


def _group(task: str, seed: int, returns: list[float], failed: int = 0):
    from core.trajectory import FAILED, FINISHED, Step, Trajectory, TrajectoryGroup, new_id

    gid = new_id()
    trajs = []
    for i, ret in enumerate(returns):
        status = FAILED if i < failed else FINISHED
        steps = [] if status == FAILED else [Step(index=0, prompt_ids=[1, 2], completion_ids=[3], logprobs=[-0.5],
                                                  policy_version=seed % 3, action="click('12')", reward=ret, done=True)]
        trajs.append(Trajectory(f"e{i}-{gid}", gid, task, seed, steps, status=status,
                                failure_reason="env server died" if status == FAILED else "", episode_return=ret))
    return TrajectoryGroup(gid, task, seed, trajs)


@pytest.mark.browser
@_in_fresh_thread
def test_index_filters_by_task_and_outcome_in_chromium(tmp_path):
    from core.trajectory import TrajectoryWriter
    from actors.viewer import write_group_html
    from cluster.run_index import RunIndex

    run_dir = tmp_path / "run"
    groups = {  # step -> groups trained at it (two tasks; solved, unsolved and failed groups)
        1: [_group("miniwob.click-test", 1, [1, 0]), _group("miniwob.click-button", 2, [0, 0])],
        2: [_group("miniwob.click-test", 3, [1, 1]), _group("miniwob.click-button", 4, [1, 0])],
    }
    failed = _group("miniwob.click-button", 5, [0, 0], failed=1)  # never trained
    writer = TrajectoryWriter(run_dir / "trajectories")
    for g in [*groups[1], *groups[2], failed]:
        writer.write(g)
        write_group_html(g, run_dir / "viewer")
    index = RunIndex(run_dir)
    index.update({groups[1][0].group_id: 1, groups[1][1].group_id: 1})
    index.update({g.group_id: 2 for g in groups[2]})  # as the driver does, one step at a time
    assert json.loads((run_dir / "index.json").read_text())["group_steps"][groups[2][1].group_id] == 2

    def shown(page) -> list[str]:
        return page.eval_on_selector_all(
            "#groups tbody tr", "rs => rs.filter(r => r.style.display !== 'none').map(r => r.dataset.task + ' ' + "
            "r.dataset.outcome + ' ' + r.cells[0].textContent)")

    with _chromium() as browser:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto((run_dir / "index.html").as_uri())
        assert len(shown(page)) == 5 and page.text_content("#shown") == "5 of 5 groups shown"
        page.select_option("#f-task", "miniwob.click-button")
        assert sorted(shown(page)) == ["miniwob.click-button failed ", "miniwob.click-button solved 2",
                                       "miniwob.click-button unsolved 1"]
        page.select_option("#f-outcome", "solved")
        assert shown(page) == ["miniwob.click-button solved 2"]
        assert page.text_content("#shown") == "1 of 5 groups shown"
        page.select_option("#f-task", index=0)  # "all"
        assert sorted(shown(page)) == ["miniwob.click-button solved 2", "miniwob.click-test solved 1",
                                       "miniwob.click-test solved 2"]
        page.select_option("#f-outcome", "failed")
        assert shown(page) == ["miniwob.click-button failed "]
        # per-task success over steps: click-test 1/2 then 2/2, click-button 0/2 then 1/2
        cells = page.eval_on_selector_all("#per-task tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
        assert cells == [["task", "1", "2"], ["miniwob.click-button", "0/2", "1/2"], ["miniwob.click-test", "1/2", "2/2"]]
        page.select_option("#f-outcome", index=0)
        page.screenshot(path=str(tmp_path / "index-filters.png"), full_page=True)


class _chromium:
    """Debian's Chromium through Playwright, headless, closed on exit (one browser at a time)."""

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        from envs.browsergym.chromium import find_chromium

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(
            executable_path=find_chromium(), headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        return self._browser

    def __exit__(self, *exc):
        self._browser.close()
        self._pw.stop()
