"""`make test` before and after a change, on the tests both runs have.

    make test ARGS="--durations=0" > before.log    # at the old commit, from a fresh clone
    make test ARGS="--durations=0" > after.log     # at the new one
    .venv/bin/python bench/compare_test_durations.py before.log after.log

A suite's total time mixes what a change saves with the tests added since, so this compares the
time of the test ids present in both runs (setup + call + teardown, as pytest's `--durations=0`
lists them; pytest leaves out entries under 5 ms), then per file, slowest first. A module- or
session-scoped fixture's setup is booked to the first test that uses it in each run; the per-file
sums are where such shifts cancel out.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

_DURATION = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)\s*$")
_SUMMARY = re.compile(r"(\d+) passed.* in ([0-9.]+)s")


def read(path: str) -> tuple[dict[str, float], float]:
    """Seconds per test id, and pytest's own total for the run (0 if the log has none)."""
    seconds: dict[str, float] = defaultdict(float)
    total = 0.0
    with open(path, errors="replace") as log:
        for line in log:
            match = _DURATION.match(line)
            if match:
                seconds[match.group(3)] += float(match.group(1))
            summary = _SUMMARY.search(line)
            if summary:
                total = float(summary.group(2))
    if not seconds:
        raise SystemExit(f"{path}: no durations (run pytest with --durations=0)")
    return dict(seconds), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--files", type=int, default=15, help="files to list, largest change first")
    args = parser.parse_args(argv)
    before, before_total = read(args.before)
    after, after_total = read(args.after)
    common = sorted(set(before) & set(after))
    b, a = sum(before[t] for t in common), sum(after[t] for t in common)
    print(f"pytest total: before {before_total:.0f} s ({len(before)} test ids timed), "
          f"after {after_total:.0f} s ({len(after)})")
    print(f"tests in both runs: {len(common)}; their time before {b:.0f} s, after {a:.0f} s, "
          f"after/before {a / max(b, 1e-9):.3f} ({b - a:+.0f} s saved)")
    print(f"only before: {len(set(before) - set(after))} ids, {sum(before[t] for t in set(before) - set(after)):.0f} s; "
          f"only after: {len(set(after) - set(before))} ids, {sum(after[t] for t in set(after) - set(before)):.0f} s")
    per_file: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for test in common:
        name = test.split("::", 1)[0]
        per_file[name][0] += before[test]
        per_file[name][1] += after[test]
    print(f"\n{'file (tests in both runs)':48s} {'before s':>9s} {'after s':>8s} {'saved s':>8s}")
    for name, (fb, fa) in sorted(per_file.items(), key=lambda kv: -abs(kv[1][0] - kv[1][1]))[: args.files]:
        print(f"{name:48s} {fb:9.1f} {fa:8.1f} {fb - fa:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
