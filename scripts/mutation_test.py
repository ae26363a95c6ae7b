"""Mutation testing (mutmut 3.3.1, the dev extra) of the core correctness modules against their
fast unit tests; prints each module's mutation score.

    python scripts/mutation_test.py [--module PATH ...] [--max-children N] [--keep DIR [--rerun]] [--diffs]

Each module is mutated on its own, against its own fast tests (MODULES), one after the other.
`--keep DIR --rerun` re-tests only the mutants an earlier `--keep DIR` run did not kill, against
the committed tests (for iterating on tests). The survivors left on purpose, with the reason
for each, are listed in docs/mutation_testing.md.

It runs in a scratch copy of the committed tree (`git archive HEAD`), never in the worktree:
mutmut writes a `mutants/` folder and reads its config from pyproject.toml. Four things make
mutmut 3.3.1 work here:
  - the non-mutated files the tests import are copied one by one (`also_copy` naming a whole
    package folder copies the originals over the mutated files), into folders made beforehand
    (mutmut's copy does not create them);
  - OMP_NUM_THREADS=1: mutmut forks each mutant's test run from a process that already used
    torch's thread pool, and a forked child hangs in its first multi-threaded op (so every
    learner/loss.py mutant ran into mutmut's timeout);
  - mutmut's stats collector reads `item._nodeid`, which pytest 9 no longer has (every stats run
    failed with AttributeError at the first test's teardown): the attribute is aliased to `nodeid`;
  - PYTHONPATH is unset, so that the mutated copies, not the worktree's originals, are imported.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Each module with the fast (no browser, no Ray, no model) unit tests that exercise it. One module
# is mutated at a time, against its own tests only: the stats run and each mutant stay short.
_LEARNER_UNITS = ["tests/test_learner.py::test_group_advantages_follow_trl_formula",
                  "tests/test_learner.py::test_batch_and_none_scaling",
                  "tests/test_learner.py::test_failed_episodes_never_enter_and_small_groups_drop",
                  "tests/test_learner.py::test_zero_variance_groups_counted_and_optionally_dropped",
                  "tests/test_learner.py::test_every_step_is_a_sample_carrying_its_episode_advantage",
                  "tests/test_learner.py::test_collate_pads_prompts_left_and_completions_right",
                  "tests/test_planted_bugs.py::test_completion_mask_marks_exactly_the_completion_positions",
                  "tests/test_learner_units.py"]
MODULES = {
    "learner/loss.py": ["tests/test_grpo_loss.py", "tests/test_learner_units.py"],
    "learner/advantages.py": _LEARNER_UNITS,
    "learner/batching.py": _LEARNER_UNITS,
    "actors/action_parser.py": ["tests/test_action_parser.py"],
    "envs/browsergym/actions.py": ["tests/test_env_actions.py"],
    "actors/episode.py": ["tests/test_episode_units.py"],
}
PACKAGES = ["actors", "learner", "envs", "cluster", "core", "weightsync"]
# mutmut's exit codes (mutmut/__main__.py status_by_exit_code)
KILLED = {1, 3}
SURVIVED = {0}
NO_TESTS = {5, 33}

RUN_MUTMUT = """
import sys
import _pytest.nodes
_pytest.nodes.Node._nodeid = property(lambda self: self.nodeid)  # mutmut 3.3.1 vs pytest 9
from mutmut.__main__ import cli
sys.argv = ["mutmut", *sys.argv[1:]]
cli()
"""


def prepare(work: Path, module: str) -> None:
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    others = sorted(str(p.relative_to(work)) for pkg in PACKAGES for p in (work / pkg).rglob("*")
                    if p.is_file() and str(p.relative_to(work)) != module)
    for pkg in PACKAGES:
        for d in [work / pkg, *(p for p in (work / pkg).rglob("*") if p.is_dir())]:
            (work / "mutants" / d.relative_to(work)).mkdir(parents=True, exist_ok=True)
    with open(work / "pyproject.toml", "a") as f:
        f.write("\n[tool.mutmut]\n")
        f.write(f"paths_to_mutate = {json.dumps([module])}\n")
        f.write(f"also_copy = {json.dumps(others)}\n")
        f.write(f"tests_dir = {json.dumps(MODULES[module])}\n")


def score(work: Path, module: str, earlier: dict[str, int] | None = None) -> tuple[Counter, list[str]]:
    """Counts by outcome and the survivors. `earlier`: a kept run's results, for the mutants this
    (re-)run did not test (mutmut forgets them when it re-tests named mutants)."""
    codes = json.loads((work / "mutants" / (module + ".meta")).read_text())["exit_code_by_key"]
    codes = {n: c if c is not None or earlier is None else earlier.get(n) for n, c in codes.items()}
    if earlier is not None:  # written back, so that a further --rerun still knows them
        meta_path = work / "mutants" / (module + ".meta")
        meta = json.loads(meta_path.read_text())
        meta["exit_code_by_key"] = codes
        meta_path.write_text(json.dumps(meta))
    c: Counter = Counter()
    survivors = []
    for name, code in codes.items():
        kind = ("killed" if code in KILLED else "survived" if code in SURVIVED
                else "no_tests" if code in NO_TESTS else "other")
        c[kind] += 1
        if kind == "survived":
            survivors.append(name)
    return c, sorted(survivors)


def refresh_tests(work: Path) -> None:
    """The committed tests/ over a kept run's (mutmut copies them into mutants/ on every run)."""
    archive = subprocess.run(["git", "archive", "HEAD", "tests"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)


def run_module(module: str, work: Path, max_children: int, diffs: bool, rerun: bool = False) -> int:
    names: list[str] = []
    earlier = None
    if rerun:
        # Only the mutants the kept run did not kill, against the current tests; the killed ones
        # stay killed (tests are only ever added or tightened). mutmut collects stats for the
        # new tests and keeps the other results in its .meta file.
        earlier = json.loads((work / "mutants" / (module + ".meta")).read_text())["exit_code_by_key"]
        names = sorted(n for n, c in earlier.items() if c in SURVIVED | NO_TESTS)
        refresh_tests(work)
        if not names:
            return 0
    else:
        prepare(work, module)
    # One torch thread: mutmut forks one child per mutant from a process whose torch thread pool
    # already ran (the stats pass), and such a child hangs at its first multi-threaded op (a
    # 512x512 matmul in a forked child never returned with 2 threads, took 0.13 s with 1). That
    # is why every learner/loss.py mutant used to end at mutmut's timeout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    rc = subprocess.run([sys.executable, "-c", RUN_MUTMUT, "run", "--max-children", str(max_children), *names],
                        cwd=work, env=env).returncode
    if rc != 0:
        print(f"{module}: mutmut run failed (exit {rc})", file=sys.stderr)
        return rc
    c, survivors = score(work, module, earlier)
    tested = c["killed"] + c["survived"]
    pct = 100.0 * c["killed"] / tested if tested else 0.0
    print(f"\n{module}: killed {c['killed']}/{tested} = {pct:.0f}% "
          f"[{c['no_tests']} no tests, {c['other']} other] in {time.monotonic() - t0:.0f}s")
    functions = _functions(work / "mutants" / module) if diffs else {}
    for name in survivors:
        print(f"    survived: {name}")
        if diffs:
            print(_diff(functions, name))
    return 0


def _functions(path: Path) -> dict[str, str]:
    """Source of every function in mutmut's mutated copy (each mutant is a renamed function)."""
    src = path.read_text()
    return {n.name: ast.get_source_segment(src, n) or "" for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _diff(functions: dict[str, str], mutant: str) -> str:
    """The changed lines of one mutant against the original (`mutmut show`, without its ~2 s start)."""
    short = mutant.rsplit(".", 1)[-1]
    orig = functions.get(short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    if orig is None or short not in functions:
        return "      (source not found)"
    base = short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    mutated = functions[short].replace(short + "(", base + "(", 1)  # signature lines compare too
    lines = difflib.unified_diff(orig.splitlines(), mutated.splitlines(), lineterm="", n=0)
    return "\n".join("      " + x for x in lines if x[:1] in "+-" and x[:3] not in ("---", "+++"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", action="append", choices=sorted(MODULES),
                    help="mutate only this module (repeatable; default: all, one after the other)")
    ap.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (the machine is shared)")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one, removed)")
    ap.add_argument("--diffs", action="store_true", help="print each surviving mutant's diff")
    ap.add_argument("--rerun", action="store_true",
                    help="with --keep DIR of an earlier run: re-test only its surviving and untested mutants "
                         "against the committed tests")
    args = ap.parse_args()
    if args.rerun and not args.keep:
        ap.error("--rerun needs --keep DIR (the earlier run's folder)")
    rc = 0
    for module in args.module or list(MODULES):
        with tempfile.TemporaryDirectory(prefix="mutmut-") as tmp:
            work = Path(args.keep) / module.replace("/", "_") if args.keep else Path(tmp)
            work.mkdir(parents=True, exist_ok=bool(not args.keep) or args.rerun)
            rc = run_module(module, work, args.max_children, args.diffs, args.rerun) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
