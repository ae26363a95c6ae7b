"""The task sampler: which task instance (task, seed) the next GRPO group plays.

Training seeds and held-out evaluation seeds come from disjoint ranges (config.validate checks).
Training seeds are drawn without replacement per task from a seeded permutation walk, so a resumed
run never replays an instance it already trained on. With `weighting: learnable`, tasks whose
recent success rate is strictly between 0 and 1 (where GRPO's group-normalised advantages are not
all zero) weigh 1 and the others `min_weight`.

The sampler's whole state is a small JSON-able dict (`state_dict` / `load_state_dict`): it is the
data cursor saved with every checkpoint. Besides the cursor it holds the instances handed out but
not yet settled (trained, or dropped with a reason: `settle`). An async run always has some in
flight or buffered when it checkpoints; after a resume they are re-issued first (same task, seed
and index), so the cursor having counted them never makes them skipped.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from cluster.config import SamplerConfig, normalize_task


@dataclass(frozen=True)
class TaskInstance:
    """One task instance: every episode of a GRPO group plays the same one."""

    task: str
    seed: int
    index: int
    """Position in the sampler's stream (0, 1, 2, ...): the data cursor."""


class TaskSampler:
    """Deterministic given (config, seed) and the sequence of `record` calls."""

    def __init__(self, config: SamplerConfig, seed: int = 0) -> None:
        self.config = config
        self.tasks = [normalize_task(t) for t in config.tasks]
        self.seed = seed
        self.cursor = 0
        """How many training instances have been handed out."""
        self._per_task_drawn = {t: 0 for t in self.tasks}
        self._recent: dict[str, deque[float]] = {t: deque(maxlen=config.success_window) for t in self.tasks}
        self._unsettled: dict[int, TaskInstance] = {}
        """Handed out by `next`, not yet `settle`d: re-issued after a resume."""
        self._reissue: deque[TaskInstance] = deque()
        """Instances unsettled at the checkpoint this run resumed from, handed out again first."""

    # --- training stream ------------------------------------------------------------------------

    def _train_seed(self, task: str, k: int) -> int:
        """The k-th training seed of `task`: an affine permutation of the seed range, so seeds are
        distinct until the range is exhausted (then the walk repeats)."""
        start, stop = self.config.train_seeds
        n = stop - start
        rng = random.Random(f"{self.seed}:{task}")
        a = rng.randrange(1, n) if n > 1 else 1
        while _gcd(a, n) != 1:
            a = rng.randrange(1, n)
        b = rng.randrange(n)
        return start + (a * k + b) % n

    def weights(self) -> dict[str, float]:
        """Current sampling weight per task."""
        if self.config.weighting == "uniform":
            return {t: 1.0 for t in self.tasks}
        out = {}
        for t in self.tasks:
            recent = self._recent[t]
            if not recent:
                out[t] = 1.0  # unknown: as good a guess as any
                continue
            rate = sum(recent) / len(recent)
            out[t] = 1.0 if 0.0 < rate < 1.0 else self.config.min_weight
        return out

    def next(self) -> TaskInstance:
        """The next training instance: an instance to re-issue after a resume, else a new one."""
        if self._reissue:
            instance = self._reissue.popleft()
            self._unsettled[instance.index] = instance
            return instance
        # The task choice depends only on (seed, cursor, weights): replayable after a resume.
        rng = random.Random(f"{self.seed}:pick:{self.cursor}")
        weights = self.weights()
        task = rng.choices(self.tasks, weights=[weights[t] for t in self.tasks])[0]
        k = self._per_task_drawn[task]
        self._per_task_drawn[task] += 1
        instance = TaskInstance(task=task, seed=self._train_seed(task, k), index=self.cursor)
        self.cursor += 1
        self._unsettled[instance.index] = instance
        return instance

    def settle(self, index: int) -> None:
        """The instance at `index` was trained on or dropped (with a counted reason): a resume
        from a later checkpoint must not issue it again."""
        self._unsettled.pop(index, None)

    def unsettled(self) -> list[TaskInstance]:
        """Instances handed out (or waiting to be re-issued) and not yet settled, by index."""
        pending = {**{i.index: i for i in self._reissue}, **self._unsettled}
        return [pending[k] for k in sorted(pending)]

    def record(self, task: str, successes: list[bool]) -> None:
        """Feeds a finished group's episode outcomes into the success-rate window."""
        task = normalize_task(task)
        if task in self._recent:
            self._recent[task].extend(1.0 if s else 0.0 for s in successes)

    def success_rates(self) -> dict[str, float | None]:
        return {t: (sum(r) / len(r) if r else None) for t, r in self._recent.items()}

    # --- evaluation ------------------------------------------------------------------------------

    def eval_instances(self, episodes_per_task: int) -> list[TaskInstance]:
        """Held-out instances: the first `episodes_per_task` seeds of the eval range for every task
        (the same ones at every evaluation, so success rates are comparable over time)."""
        start, stop = self.config.eval_seeds
        n = min(episodes_per_task, stop - start)
        return [TaskInstance(task=t, seed=start + i, index=-1) for t in self.tasks for i in range(n)]

    # --- data cursor -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "per_task_drawn": dict(self._per_task_drawn),
            "recent": {t: list(r) for t, r in self._recent.items()},
            "seed": self.seed,
            "tasks": list(self.tasks),
            "unsettled": [[i.task, i.seed, i.index] for i in self.unsettled()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("tasks", self.tasks)) != self.tasks:
            raise ValueError(
                f"sampler state was saved for tasks {state.get('tasks')}, this run has {self.tasks}; "
                "resuming with a different task list would replay or skip instances"
            )
        self.cursor = int(state["cursor"])
        self._per_task_drawn = {t: int(state["per_task_drawn"].get(t, 0)) for t in self.tasks}
        for t in self.tasks:
            self._recent[t].clear()
            self._recent[t].extend(state.get("recent", {}).get(t, []))
        self._unsettled = {}
        self._reissue = deque(TaskInstance(task=t, seed=int(s), index=int(i)) for t, s, i in state.get("unsettled", []))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
