"""Writes cluster/grafana/bgrpo_grafana_dashboard.json: the Grafana dashboard of the bgrpo_* metrics.

    python -m cluster.grafana.make_dashboard            (re)write the JSON next to this file
    python -m cluster.grafana.make_dashboard --check    exit 1 if the committed JSON is out of date

It is made the way Ray makes its own dashboards (ray/dashboard/modules/metrics/dashboards/): panels
declared with Ray's `Panel` / `Row` / `Target` classes and rendered by Ray's dashboard factory over
a base JSON (bgrpo_grafana_dashboard_base.json, shaped like Ray's train_grafana_dashboard_base.json),
so it has the same grid, panel style, datasource variable and SessionName filter as the dashboards
Ray provisions. Put the JSON in the folder Ray provisions Grafana from and it appears in Grafana's
"Ray" folder beside Ray's own (README, "Metrics and the Ray dashboard").

Prometheus names: Ray exports `bgrpo_x` as `ray_bgrpo_x`; counters get `_total`; histograms
`_bucket`, `_sum` and `_count`. Every series carries the `run` tag (the run name); the per-task
gauges also `task`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory
from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig, Panel, Row, Target

HERE = Path(__file__).resolve().parent
DASHBOARD_JSON = HERE / "bgrpo_grafana_dashboard.json"
BASE_JSON = HERE / "bgrpo_grafana_dashboard_base.json"
UID = "bgrpoDashboard"

# `{global_filters}` is filled in by Ray's factory (SessionName, plus any the user sets with
# RAY_GRAFANA_BGRPO_DASHBOARD_GLOBAL_FILTERS); doubled braces are literal PromQL braces.
_RUN = 'run=~"$run", {global_filters}'
_TASK = 'run=~"$run", task=~"$task", {global_filters}'


def _graph(id: int, title: str, description: str, unit: str, targets: list[Target], **kw) -> Panel:
    # Lines, not Ray's default stacked areas: these are rates and ratios per run, not parts of a whole.
    return Panel(id=id, title=title, description=description, unit=unit, targets=targets, fill=0, stack=False, **kw)


ROWS = [
    Row(title="Learning", id=100, panels=[
        _graph(1, "Success rate per task", "Success rate of the episodes trained at each learner step, per task "
               "(bgrpo_task_success_rate), with the greedy evaluation on held-out seeds where it ran.", "percentunit", [
                   Target(expr=f"max(ray_bgrpo_task_success_rate{{{{{_TASK}}}}}) by (run, task)",
                          legend="{{run}} {{task}}"),
                   Target(expr=f"max(ray_bgrpo_eval_task_success_rate{{{{{_TASK}}}}}) by (run, task)",
                          legend="{{run}} {{task}} (eval)"),
               ], min_val=0, max_val=1),
        _graph(2, "Reward per task", "Mean episode return of the episodes trained at each learner step, per task "
               "(bgrpo_task_reward_mean), and over all tasks.", "short", [
                   Target(expr=f"max(ray_bgrpo_task_reward_mean{{{{{_TASK}}}}}) by (run, task)",
                          legend="{{run}} {{task}}"),
                   Target(expr=f"max(ray_bgrpo_reward_mean{{{{{_RUN}}}}}) by (run)", legend="{{run}} all tasks"),
               ]),
        _graph(3, "Policy version and lag", "The learner's policy version, and how many versions behind it the "
               "tokens of each step's batch were (0 in sync mode; at most cluster.max_staleness in async).", "short", [
                   Target(expr=f"max(ray_bgrpo_policy_version{{{{{_RUN}}}}}) by (run)", legend="{{run}} version"),
                   Target(expr=f"max(ray_bgrpo_policy_lag_max{{{{{_RUN}}}}}) by (run)", legend="{{run}} lag max"),
                   Target(expr=f"max(ray_bgrpo_policy_lag_mean{{{{{_RUN}}}}}) by (run)", legend="{{run}} lag mean"),
               ]),
        _graph(4, "Episodes per second", "Episodes trained per second over the window, and the driver's "
               "running average since the start (bgrpo_samples_per_s).", "short", [
                   Target(expr=f"sum(rate(ray_bgrpo_episodes_trained_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} trained/s"),
                   Target(expr=f"sum(rate(ray_bgrpo_episodes_started_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} started/s"),
                   Target(expr=f"max(ray_bgrpo_samples_per_s{{{{{_RUN}}}}}) by (run)", legend="{{run}} since start"),
               ]),
    ]),
    Row(title="Learner and weight sync", id=101, panels=[
        _graph(5, "Learner step time", "Seconds per learner step (train_step call): mean over the window and "
               "the 90th percentile of the histogram.", "s", [
                   Target(expr=f"sum(rate(ray_bgrpo_learner_step_s_sum{{{{{_RUN}}}}}[$window])) by (run) / "
                               f"sum(rate(ray_bgrpo_learner_step_s_count{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} mean"),
                   Target(expr=f"histogram_quantile(0.9, sum(rate(ray_bgrpo_learner_step_s_bucket{{{{{_RUN}}}}}"
                               f"[$window])) by (run, le))", legend="{{run}} p90"),
               ]),
        _graph(6, "Learner tokens per second", "Trained completion tokens per second: over the window from the "
               "token counter, and per step as the driver measured it (bgrpo_tokens_per_s).", "short", [
                   Target(expr=f"sum(rate(ray_bgrpo_trained_tokens_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} window"),
                   Target(expr=f"max(ray_bgrpo_tokens_per_s{{{{{_RUN}}}}}) by (run)", legend="{{run}} last step"),
               ]),
        _graph(7, "Weight sync seconds", "Seconds to publish the new weights and load them on every engine "
               "(bgrpo_weight_sync_s): mean over the window and 90th percentile.", "s", [
                   Target(expr=f"sum(rate(ray_bgrpo_weight_sync_s_sum{{{{{_RUN}}}}}[$window])) by (run) / "
                               f"sum(rate(ray_bgrpo_weight_sync_s_count{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} mean"),
                   Target(expr=f"histogram_quantile(0.9, sum(rate(ray_bgrpo_weight_sync_s_bucket{{{{{_RUN}}}}}"
                               f"[$window])) by (run, le))", legend="{{run}} p90"),
               ]),
        _graph(8, "Where the time goes", "Mean seconds per learner step spent waiting for groups (collect), "
               "training, and syncing weights; and the fraction of wall time the learner was idle.", "s", [
                   Target(expr=f"sum(rate(ray_bgrpo_collect_s_sum{{{{{_RUN}}}}}[$window])) by (run) / "
                               f"sum(rate(ray_bgrpo_collect_s_count{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} collect"),
                   Target(expr=f"max(ray_bgrpo_learner_idle_frac{{{{{_RUN}}}}}) by (run)",
                          legend="{{run}} learner idle fraction"),
               ]),
    ]),
    Row(title="Failures and engines", id=102, panels=[
        _graph(9, "Env and actor failures", "Env server / session failures seen by the rollout workers, "
               "rollout-worker crashes or timeouts, and episodes lost to them (never scored), over the window.",
               "short", [
                   Target(expr=f"sum(increase(ray_bgrpo_env_failures_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} env failures"),
                   Target(expr=f"sum(increase(ray_bgrpo_actor_failures_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} actor failures"),
                   Target(expr=f"sum(increase(ray_bgrpo_episodes_failed_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} episodes failed"),
               ]),
        _graph(10, "Episodes dropped", "Episodes not trained on: dropped groups (failed, stale, too small) and "
               "groups dropped for exceeding max_staleness, over the window.", "short", [
                   Target(expr=f"sum(increase(ray_bgrpo_episodes_dropped_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} episodes dropped"),
                   Target(expr=f"sum(increase(ray_bgrpo_groups_dropped_stale_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} groups dropped stale"),
               ]),
        _graph(11, "Engine sleeps", "Engines put to sleep while the learner trained (cluster.colocate: the "
               "learner gets the GPU memory), over the window.", "short", [
                   Target(expr=f"sum(increase(ray_bgrpo_engine_sleeps_total{{{{{_RUN}}}}}[$window])) by (run)",
                          legend="{{run}} sleeps"),
               ]),
        _graph(12, "Env steps per second", "Environment steps taken by all rollout workers per second.", "short", [
            Target(expr=f"sum(rate(ray_bgrpo_env_steps_total{{{{{_RUN}}}}}[$window])) by (run)",
                   legend="{{run}} env steps/s"),
        ]),
    ]),
]

DASHBOARD = DashboardConfig(
    name="BGRPO",  # Ray's factory reads RAY_GRAFANA_BGRPO_DASHBOARD_UID / _GLOBAL_FILTERS overrides
    default_uid=UID,
    rows=ROWS,
    standard_global_filters=['SessionName=~"$SessionName"'],
    # Ray's factory joins this to its own dashboards folder; an absolute path wins in os.path.join.
    base_json_file_name=str(BASE_JSON),
)


def render() -> str:
    """The dashboard JSON, as Ray's factory renders it (plus a trailing newline)."""
    content, _uid = factory._generate_grafana_dashboard(DASHBOARD)
    return content + "\n"


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel, rows included."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out.extend((p["title"], t["expr"]) for t in p.get("targets", []))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.grafana.make_dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from a fresh render")
    args = parser.parse_args(argv)
    content = render()
    if args.check:
        current = DASHBOARD_JSON.read_text(encoding="utf-8") if DASHBOARD_JSON.is_file() else ""
        if json.loads(current or "null") != json.loads(content):
            print(f"{DASHBOARD_JSON} is out of date: run python -m cluster.grafana.make_dashboard")
            return 1
        print(f"{DASHBOARD_JSON} is up to date")
        return 0
    DASHBOARD_JSON.write_text(content, encoding="utf-8")
    print(DASHBOARD_JSON)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
