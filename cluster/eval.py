"""Held-out evaluation: one function for `bgrpo eval` and the driver's periodic evaluation.

A policy plays a fixed list of held-out instances (`TaskSampler.eval_instances`: the first N seeds
of `sampler.eval_seeds`, a range disjoint from the training seeds by validation), greedy or
sampled. Per task: episodes, successes, infrastructure failures and the success rate with its 95 %
Wilson interval. An episode that failed for infrastructure reasons (env died, timeout, engine
error) is reported as a failure and left out of the rate: it says nothing about the policy, so it is
never counted as 0.

    bgrpo eval --config local --model runs/X/checkpoints [--eval.episodes_per_task 50] [--out DIR]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from core.group_meta import GroupMeta, as_meta
from core.trajectory import FAILED, TrajectoryGroup

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ((0, 1) when n == 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(s1: int, n1: int, s2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """95 % interval of p2 - p1 (Newcombe's hybrid score method, from the two Wilson intervals)."""
    if n1 <= 0 or n2 <= 0:
        return -1.0, 1.0
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson_interval(s1, n1, z)
    l2, u2 = wilson_interval(s2, n2, z)
    d = p2 - p1
    return d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def summarize(instances: Sequence[tuple[str, int]],
              outcomes: Sequence[GroupMeta | TrajectoryGroup | BaseException]) -> dict[str, Any]:
    """Per-task and overall counts, rates and intervals from each instance's group metadata (or
    the exception that running it raised: an infrastructure failure of all its episodes)."""
    per_task: dict[str, dict[str, Any]] = {}
    for (task, seed), outcome in zip(instances, outcomes):
        row = per_task.setdefault(task, {"episodes": 0, "successes": 0, "failures": 0, "failure_reasons": []})
        if isinstance(outcome, BaseException):
            row["failures"] += 1
            row["failure_reasons"].append(f"seed {seed}: {type(outcome).__name__}: {outcome}"[:300])
            continue
        for t in as_meta(outcome).episodes:
            if t.status == FAILED:
                row["failures"] += 1
                row["failure_reasons"].append(f"seed {seed}: {t.failure_reason}"[:300])
            else:
                row["episodes"] += 1
                row["successes"] += int(t.success)
    for row in per_task.values():
        _rate(row)
        row["failure_reasons"] = row["failure_reasons"][:5]
    overall = {k: sum(r[k] for r in per_task.values()) for k in ("episodes", "successes", "failures")}
    _rate(overall)
    return {"tasks": per_task, "overall": overall, "seeds": [[t, s] for t, s in instances]}


def _rate(row: dict[str, Any]) -> None:
    n, k = row["episodes"], row["successes"]
    row["success_rate"] = k / n if n else None
    row["ci95"] = list(wilson_interval(k, n)) if n else None


def evaluate(
    run_groups: Callable[[list[tuple[str, int]]], list[GroupMeta | TrajectoryGroup | BaseException]],
    instances: Sequence[tuple[str, int]],
    policy_version: int | None = None,
) -> dict[str, Any]:
    """Plays every (task, seed) once through `run_groups` (which returns, per instance, its group
    or the exception that running it raised) and summarizes. The driver passes a function over
    its evaluation actor, `bgrpo eval` one over an in-process rollout worker."""
    t0 = time.monotonic()
    instances = [(str(t), int(s)) for t, s in instances]
    outcomes = run_groups(instances)
    result = summarize(instances, outcomes)
    result["policy_version"] = policy_version
    result["eval_s"] = time.monotonic() - t0
    return result


def metrics_record(result: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics-file record of an evaluation (names the plots and the progress bar read).

    An evaluation in which any episode failed for infrastructure reasons (session refused, env died
    or hung, group timed out) is `eval_status: failed`, with the count and the reasons, and has no
    success-rate keys at all: counting those episodes as 0 % once reported a broken evaluation as a
    result, and a rate over the survivors would be biased towards whatever did not fail. The
    details (`result`, also written as JSON) keep the per-task counts either way."""
    overall = result["overall"]
    started = overall["episodes"] + overall["failures"]
    record: dict[str, Any] = {
        "event": "eval",
        "eval_policy_version": result.get("policy_version"),
        "eval_s": result.get("eval_s", 0.0),
        "eval_episodes": started,
        "eval_episodes_failed": overall["failures"],
    }
    if overall["failures"] or not overall["episodes"]:
        # Each reason reads "seed N: <kind>: <detail>"; count the kinds.
        reasons = Counter(r.split(": ")[1] if ": " in r else r
                          for row in result["tasks"].values() for r in row["failure_reasons"])
        examples = [r for row in result["tasks"].values() for r in row["failure_reasons"]]
        record.update(eval_status="failed", eval_failure_reasons=dict(reasons) or {"no_episodes": 1},
                      eval_failure_example=examples[0][:300] if examples else "no episodes ran")
        return record
    record["eval_status"] = "ok"
    record["eval_success_rate"] = overall["success_rate"]
    record["eval_ci95_low"], record["eval_ci95_high"] = overall["ci95"]
    for task, row in result["tasks"].items():
        record[f"eval/{task}/success_rate"] = row["success_rate"]
    return record


def format_rate(row: dict[str, Any]) -> str:
    """'0.62 [0.48, 0.74] (n=48)' or 'n/a (0 episodes)'."""
    if not row.get("episodes"):
        return f"n/a (0 episodes, {row.get('failures', 0)} failed)"
    lo, hi = row["ci95"]
    failed = f", {row['failures']} failed" if row.get("failures") else ""
    return f"{row['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] (n={row['episodes']}{failed})"


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Overall success before -> after with the difference's 95 % interval (same seeds)."""
    b, a = before["overall"], after["overall"]
    lo, hi = difference_interval(b["successes"], b["episodes"], a["successes"], a["episodes"])
    diff = (a["success_rate"] or 0.0) - (b["success_rate"] or 0.0)
    return {"before": b, "after": a, "difference": diff, "difference_ci95": [lo, hi],
            "significant": lo > 0 or hi < 0}


def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes a result atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)
    return path


def resolve_policy(path: str) -> str:
    """A model folder, or a checkpoint (a `checkpoints` root with `latest`, or one step folder):
    the Hugging Face model folder to load."""
    from learner import checkpoint as ckpt

    p = Path(path)
    if (p / "latest").exists() or (p / ckpt.MODEL_DIR / "config.json").is_file():
        return str(ckpt.resolve(p) / ckpt.MODEL_DIR)
    if (p / "checkpoints" / "latest").exists():  # a run folder
        return str(ckpt.resolve(p / "checkpoints") / ckpt.MODEL_DIR)
    from cluster.models import resolve_model

    return resolve_model(path)


# --- bgrpo eval ---------------------------------------------------------------------------------


USAGE = """usage: bgrpo eval [--config NAME|PATH] [--model MODEL|CHECKPOINT] [--out DIR] [--SECTION.FIELD VALUE ...]

Evaluate a model or checkpoint on the held-out seeds of sampler.tasks (eval.episodes_per_task seeds
each, from sampler.eval_seeds), greedy unless --eval.greedy false; per task success with a 95 %
Wilson interval. Writes DIR/eval.json, DIR/trajectories/ and DIR/viewer/ (DIR default runs/eval-TIME).
"""


def main(argv: list[str] | None = None) -> int:
    import copy
    import dataclasses
    import logging

    from cluster.config import ConfigError, parse_cli
    from cluster.sampler import TaskSampler

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    own: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key = argv[i].partition("=")[0]
        if key in ("--model", "--out"):
            if "=" in argv[i]:
                own[key[2:]] = argv[i].partition("=")[2]
            elif i + 1 < len(argv):
                own[key[2:]] = argv[i + 1]
                i += 1
            else:
                print(f"bgrpo eval: {key} needs a value", file=sys.stderr)
                return 2
        else:
            rest.append(argv[i])
        i += 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = parse_cli(rest).config
    except ConfigError as e:
        print(f"bgrpo eval: bad config: {e}", file=sys.stderr)
        return 2
    out = Path(own.get("out") or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    model_path = resolve_policy(own.get("model") or cfg.model)
    from actors.rollout_worker import RolloutWorker

    rollout = eval_rollout(cfg)
    engine = copy.deepcopy(cfg.engine)
    engine.model = model_path
    instances = [(x.task, x.seed) for x in TaskSampler(cfg.sampler, cfg.cluster.seed).eval_instances(cfg.eval.episodes_per_task)]
    with RolloutWorker("eval", rollout, engine, cfg.env, out) as worker:
        result = evaluate(in_process_runner(worker, rollout.num_sessions), instances, worker.policy_version)
    result["model"] = model_path
    result["sampling"] = dataclasses.asdict(rollout.sampling)
    write_json(result, out / "eval.json")
    for task, row in result["tasks"].items():
        print(f"  {task}: {format_rate(row)}")
    print(f"bgrpo eval: success {format_rate(result['overall'])}; {out / 'eval.json'}", flush=True)
    return 0 if result["overall"]["episodes"] else 1


def eval_sessions(cfg: Any) -> int:
    """Env sessions of the evaluation worker (eval.num_sessions where the config has it)."""
    return max(1, int(getattr(cfg.eval, "num_sessions", 1)))


def eval_rollout(cfg: Any) -> Any:
    """The evaluation worker's rollout settings: greedy unless eval.greedy is false (run_group has
    no per-call sampling, so evaluation has a worker of its own), eval_sessions sessions."""
    import copy
    import dataclasses

    rollout = copy.deepcopy(cfg.rollout)
    if cfg.eval.greedy:
        rollout.sampling = dataclasses.replace(rollout.sampling, temperature=0.0, top_k=-1, top_p=1.0)
    rollout.num_sessions = eval_sessions(cfg)
    return rollout


def evaluate_in_run(worker: Any, version: int, instances: Sequence[tuple[str, int]], timeout_s: float,
                    step: int, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The driver's periodic evaluation: plays `instances` on the evaluation actor (which holds
    the learner's `version`, loaded by the caller) and writes run_dir/eval/eval-stepN.json.
    Returns (details, the metrics record)."""
    import logging

    details = evaluate(ray_runner(worker, timeout_s), instances, version)
    details["step"] = step
    write_json(details, Path(run_dir) / "eval" / f"eval-step{step:06d}.json")
    result = metrics_record(details)
    if result["eval_status"] != "ok":
        logging.getLogger("bgrpo.driver").warning(
            "evaluation at step %d FAILED: %d of %d episodes failed (%s); no success rate is reported",
            step, result["eval_episodes_failed"], result["eval_episodes"], result["eval_failure_reasons"])
    return details, result


def in_process_runner(worker: Any, concurrency: int) -> Callable[[list[tuple[str, int]]], list[Any]]:
    """`run_groups` over a plain RolloutWorker: up to `concurrency` instances at once."""
    from concurrent.futures import ThreadPoolExecutor

    def run(instances: list[tuple[str, int]]) -> list[Any]:
        def one(inst: tuple[str, int]) -> Any:
            try:
                return worker.run_group(inst[0], inst[1], 1)
            except Exception as exc:  # noqa: BLE001 - reported as this instance's failure
                return exc

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, instances))

    return run


def ray_runner(actor: Any, timeout_s: float) -> Callable[[list[tuple[str, int]]], list[Any]]:
    """`run_groups` over a RolloutWorker actor: every instance submitted at once (the actor runs
    as many as its concurrency and sessions allow); returns each group's metadata."""

    def run(instances: list[tuple[str, int]]) -> list[Any]:
        import ray

        # Metadata only: the groups stay in the object store (written to disk by the worker) and
        # are freed when their refs, dropped here, go out of scope.
        refs = [actor.run_group_by_ref.remote(t, s, 1)[0] for t, s in instances]
        out: list[Any] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except Exception as exc:  # noqa: BLE001 - the instance's failure, reported
                out.append(exc)
        return out

    return run
