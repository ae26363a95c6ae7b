"""The data that crosses actors: steps, trajectories (episodes) and GRPO groups.

One module owns these types and their Parquet schema so that the rollout side (which writes
them) and the learner (which trains on them) can never disagree. A `Step` records exactly what
the engine sampled: the prompt and completion token ids, the per-token logprobs and policy
versions, plus the images the prompt contained (PNG bytes). The learner trains on these ids and
images as they are; nothing downstream re-tokenizes text.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

FINISHED = "finished"  # the env said done (success or failure is in the reward)
TRUNCATED = "truncated"  # max_steps reached before the env said done
FAILED = "failed"  # infrastructure failure (env died, timeout...): never trained on, never scored
EPISODE_STATUSES = (FINISHED, TRUNCATED, FAILED)


@dataclass
class Step:
    """One observation -> action -> env step, exactly as sampled."""

    index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    """Per-token logprobs of the sampled completion tokens (processed: temperature/top-k applied)."""
    policy_version: int
    """The oldest policy version among the completion's tokens (= the version the engine had
    when it started the step; the staleness figures and the async staleness filter use it)."""
    images: list[bytes] = field(default_factory=list)
    """PNG bytes of the images in the prompt, in prompt order (what the engine saw)."""
    completion_text: str = ""
    """decode(completion_ids): the raw model output."""
    action: str = ""
    """The action string sent to the env after parsing."""
    parse_fallback: bool = False
    """True when the parser found no action call and sent the fallback (`noop()`)."""
    reward: float = 0.0
    done: bool = False
    action_error: str = ""
    finish_reason: str = ""
    engine_s: float = 0.0
    env_s: float = 0.0
    temperature: float | None = None
    """Sampling temperature the completion was drawn with (None: not recorded, e.g. a
    hand-built step; the learner then uses its configured `grpo.temperature`)."""
    top_k: int | None = None
    """Top-k the completion was drawn with (<= 0: off; None: not recorded)."""
    top_p: float | None = None
    """Top-p the completion was drawn with (1.0: off; None: not recorded)."""
    token_versions: list[int] = field(default_factory=list)
    """The policy version that sampled each completion token. They differ within a step only when
    a weight update landed while the engine generated it (`engine.weight_update: in_flight`).
    Empty when built (or read from a file written before this field): every token is
    `policy_version`."""

    def __post_init__(self) -> None:
        if len(self.completion_ids) != len(self.logprobs):
            raise ValueError(
                f"step {self.index}: {len(self.completion_ids)} completion ids but "
                f"{len(self.logprobs)} logprobs"
            )
        if not self.token_versions:
            self.token_versions = [self.policy_version] * len(self.completion_ids)
        if len(self.token_versions) != len(self.completion_ids):
            raise ValueError(f"step {self.index}: {len(self.completion_ids)} completion ids but "
                             f"{len(self.token_versions)} token versions")
        if self.token_versions and min(self.token_versions) != self.policy_version:
            raise ValueError(f"step {self.index}: policy_version {self.policy_version} is not the oldest "
                             f"token version {min(self.token_versions)}")


@dataclass
class Trajectory:
    """One episode of one task instance."""

    episode_id: str
    group_id: str
    task: str
    seed: int
    steps: list[Step] = field(default_factory=list)
    status: str = FINISHED
    failure_reason: str = ""
    episode_return: float | None = 0.0
    """The episode's return; None for a FAILED episode (no outcome of the policy: a reader must
    never count it as a reward of 0)."""
    goal: str = ""
    worker_id: str = ""
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in EPISODE_STATUSES:
            raise ValueError(f"status must be one of {EPISODE_STATUSES}, got {self.status!r}")

    @property
    def trainable(self) -> bool:
        """Failed episodes never enter training (their outcome is not the policy's)."""
        return self.status != FAILED and len(self.steps) > 0

    @property
    def policy_versions(self) -> list[int]:
        return [s.policy_version for s in self.steps]

    @property
    def success(self) -> bool:
        return self.status == FINISHED and self.episode_return is not None and self.episode_return > 0


@dataclass
class TrajectoryGroup:
    """G episodes of the same task instance (same task name and seed): one GRPO group."""

    group_id: str
    task: str
    seed: int
    trajectories: list[Trajectory] = field(default_factory=list)

    def __post_init__(self) -> None:
        for t in self.trajectories:
            if (t.task, t.seed, t.group_id) != (self.task, self.seed, self.group_id):
                raise ValueError(
                    f"episode {t.episode_id} ({t.task}, {t.seed}, {t.group_id}) does not belong "
                    f"to group ({self.task}, {self.seed}, {self.group_id})"
                )

    @property
    def trainable_trajectories(self) -> list[Trajectory]:
        return [t for t in self.trajectories if t.trainable]

    @property
    def min_policy_version(self) -> int:
        """Oldest policy version that produced any token of this group (-1 if no steps)."""
        versions = [v for t in self.trajectories for v in t.policy_versions]
        return min(versions) if versions else -1

    @property
    def returns(self) -> list[float]:
        return [t.episode_return for t in self.trainable_trajectories]


def new_id() -> str:
    return uuid.uuid4().hex[:12]


# --- Parquet: one row per episode, steps as a nested list -------------------------------------

STEP_TYPE = pa.struct(
    [
        ("index", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("completion_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),
        ("policy_version", pa.int64()),
        ("images", pa.list_(pa.binary())),
        ("completion_text", pa.string()),
        ("action", pa.string()),
        ("parse_fallback", pa.bool_()),
        ("reward", pa.float64()),
        ("done", pa.bool_()),
        ("action_error", pa.string()),
        ("finish_reason", pa.string()),
        ("engine_s", pa.float64()),
        ("env_s", pa.float64()),
        ("temperature", pa.float64()),
        ("top_k", pa.int32()),
        ("top_p", pa.float64()),
        ("token_versions", pa.list_(pa.int64())),
    ]
)

TRAJECTORY_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("group_id", pa.string()),
        ("task", pa.string()),
        ("seed", pa.int64()),
        ("steps", pa.list_(STEP_TYPE)),
        ("status", pa.string()),
        ("failure_reason", pa.string()),
        ("episode_return", pa.float64()),
        ("goal", pa.string()),
        ("worker_id", pa.string()),
        ("wall_s", pa.float64()),
    ]
)

# float32 logprobs in Parquet: the learner reads them back as float32 tensors anyway.
_STEP_FIELDS = [f.name for f in dataclasses.fields(Step)]
_TRAJ_FIELDS = [f.name for f in dataclasses.fields(Trajectory)]


def groups_to_table(groups: Iterable[TrajectoryGroup]) -> pa.Table:
    rows = []
    for g in groups:
        for t in g.trajectories:
            row = {k: getattr(t, k) for k in _TRAJ_FIELDS if k != "steps"}
            row["steps"] = [{k: getattr(s, k) for k in _STEP_FIELDS} for s in t.steps]
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)


def table_to_groups(table: pa.Table) -> list[TrajectoryGroup]:
    groups: dict[str, TrajectoryGroup] = {}
    for row in table.to_pylist():
        # A file written before `token_versions` existed reads back as None: all policy_version.
        steps = [Step(**{**s, "token_versions": s.get("token_versions") or []}) for s in row.pop("steps")]
        traj = Trajectory(steps=steps, **row)
        g = groups.get(traj.group_id)
        if g is None:
            g = groups[traj.group_id] = TrajectoryGroup(traj.group_id, traj.task, traj.seed)
        g.trajectories.append(traj)
    return list(groups.values())


class TrajectoryWriter:
    """Appends every finished group to a Parquet dataset (one file per group) in the run folder.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.groups_written = 0

    def write(self, group: TrajectoryGroup) -> Path:
        path = self.directory / f"group-{group.group_id}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(groups_to_table([group]), tmp, compression="zstd")
        os.replace(tmp, path)
        self.groups_written += 1
        return path


def read_trajectories(directory: str | os.PathLike) -> list[TrajectoryGroup]:
    """Loads every group of a trajectory dataset written by `TrajectoryWriter`."""
    files = sorted(Path(directory).glob("group-*.parquet"))
    if not files:
        return []
    table = pa.concat_tables([pq.read_table(f, schema=TRAJECTORY_SCHEMA) for f in files])
    return table_to_groups(table)
