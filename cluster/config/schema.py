"""The schema of `bgrpo train`'s configuration: the sub-configs cluster/ owns and the root tree.

The other layers' sub-configs are imported statically: each layer owns its options and their
docstrings, and this tree only composes them. Validation of types and of unknown keys is pydantic's
(cluster/config/loader.py); each sub-config's `validate()` checks its own values and
cluster/config/checks.py the combinations across sub-configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import ConfigDict, with_config

from actors.config import RolloutConfig
from actors.engines.config import EngineConfig
from envs.browsergym.config import EnvConfig
from learner.config import GRPOConfig, LearnerConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what is wrong."""


# --- the sub-configs owned by cluster/ ------------------------------------------------------------


@dataclass
class ClusterConfig:
    """Where and how the run executes: Ray connection, actor counts and resources, loop mode."""

    address: str = ""
    """Ray address. "" = auto: join the cluster of the Ray job we run in (RAY_ADDRESS is set by
    `ray job submit`), else start a fresh local cluster. "local" forces a fresh local cluster;
    "auto" or "HOST:PORT" or "ray://HOST:PORT" joins an existing one."""
    num_cpus: int = 0
    """Logical CPUs of a fresh local cluster (0 = Ray's default: the machine's cores). Ignored
    when joining a cluster. Logical CPUs may exceed the cores: most actors mostly wait."""
    num_rollout_workers: int = 2
    """Rollout workers (Ray actors), each owning one inference engine and its env sessions."""
    rollout_num_gpus: float = 0.0
    """GPUs per rollout worker (its vLLM engine). 0 on CPU machines; fractions share a GPU."""
    rollout_num_cpus: float = 1.0
    """CPUs reserved per rollout worker."""
    learner_num_ranks: int = 1
    """Learner ranks (torch.distributed processes, one Ray actor each)."""
    learner_num_gpus: float = 0.0
    """GPUs per learner rank (0 on CPU machines)."""
    learner_num_cpus: float = 1.0
    """CPUs reserved per learner rank."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the rollout bundles (the learner group is always PACK)."""
    env_placement: Literal["embedded", "ray_actors", "remote"] = "embedded"
    """Where the BrowserGym env servers run. "embedded": server processes on 127.0.0.1 next to
    each rollout worker (local default). "ray_actors": CPU-only Ray actors spread over the
    cluster's nodes, so browsers scale with CPU nodes rather than GPUs. "remote": the URLs in
    `env_server_urls` (e.g. upstream OpenEnv servers)."""
    env_servers_per_worker: int = 1
    """Env server processes per rollout worker (sessions inside one server run one at a time,
    so parallelism comes from processes)."""
    env_server_num_cpus: float = 1.0
    """CPUs reserved per env-server Ray actor (env_placement = ray_actors)."""
    env_host_resources: dict[str, float] = field(default_factory=dict)
    """env_placement ray_actors: custom Ray resources each env-server host actor asks for, e.g.
    {browsers: 1}: the hosts then run only on nodes started with that resource (`ray start
    --resources '{"browsers": 8}'`), and a host lost with its node is recreated on another such
    node (added later, if none is left). Empty: any node with CPUs."""
    env_server_urls: list[str] = field(default_factory=list)
    """Base URLs of existing env servers (env_placement = remote), dealt round-robin to workers."""
    env_server_tasks: dict[str, list[str]] = field(default_factory=dict)
    """env_placement remote: the tasks each server URL serves, {url: [task, ...]}; a URL not listed
    serves every task (this project's servers switch task per episode). Upstream OpenEnv servers
    serve only the task they were started with (BROWSERGYM_TASK_NAME): list it here, and every
    episode goes to a server of its task (every worker then reaches every URL). Every episode is
    checked to be the task and seed it asked for, whatever this says."""
    env_server_trust_seed: bool = False
    """env_placement remote: accept servers that do not report an episode's seed (upstream OpenEnv's
    passes the seed to BrowserGym but never reports it). Off: such a server is refused with an error."""
    mode: Literal["sync", "async"] = "sync"
    """"sync": collect with version v, train, publish v+1, every worker loads v+1 before sampling
    again (on-policy). "async": workers never wait; the learner trains on groups at most
    `max_staleness` versions old and drops older ones (counted)."""
    max_staleness: int = 1
    """Async: the oldest token of a trained group is at most this many versions behind the
    learner. Sync runs are always 0-stale."""
    groups_per_step: int = 2
    """GRPO groups (each G episodes of one task instance) per learner step."""
    total_steps: int = 3
    """Learner steps (optimizer updates) to run; the run ends after this many."""
    seed: int = 0
    """Global seed: task sampler, engines' sampling, learner initialisation."""
    run_dir: str = ""
    """Run folder (config, metrics, plots, trajectories, checkpoints). "" = runs/<time>-<preset>."""
    run_name: str = ""
    """Name of the run in trackers and the run folder ("" = the preset name)."""
    group_timeout_s: float = 900.0
    """Longest a rollout worker may take for one group before it counts as an actor failure."""
    max_actor_failures: int = 3
    """Rollout-worker failures (a group that raised or timed out) tolerated before the run stops
    with an error. A worker whose actor died is restarted instead (worker_restart_budget)."""
    worker_restart_budget: int = 3
    """Rollout workers whose actor died (process killed, node lost) are replaced by a new actor at
    the same placement, loaded with the current weights, and their groups in flight are re-issued
    with the same task and seed: at most this many restarts within worker_restart_window_s; one
    more ends the run with the worker's last error. 0: a dead worker ends the run. Not with
    weight_sync nccl (the NCCL group would have to be re-formed): there a dead worker ends the run."""
    worker_restart_window_s: float = 3600.0
    """The sliding time window, in seconds, over which worker_restart_budget counts restarts."""
    learner_restart_budget: int = 1
    """A learner rank whose actor died (process killed, node lost): the whole learner group is
    rebuilt at the same placement from the run's last checkpoint (before the first one: the warm
    start's, else the initial model), the steps trained after it are undone and the run goes on
    to total_steps; engines get its weights under a version above every one they have seen. At
    most this many restarts within learner_restart_window_s; one more ends the run with the
    `bgrpo train --resume RUN_DIR` line. 0: a dead learner ends the run. Not with weight_sync nccl
    (the NCCL group would have to be re-formed): there a dead learner ends the run."""
    learner_restart_window_s: float = 3600.0
    """The sliding time window, in seconds, over which learner_restart_budget counts restarts."""
    max_failed_groups_in_a_row: int = 20
    """Groups returned failed (after their re-runs) one after another, with no good group in
    between, before the run stops with an error: the env servers or engines fail every episode
    (e.g. every remote server down), and the run would otherwise go on dropping groups forever."""
    shutdown_timeout_s: float = 30.0
    """How long shutdown waits for each actor to close its engine and browsers before killing it."""
    colocate: bool = False
    """Hybrid placement: learner rank i and rollout worker i share one placement bundle, i.e. one
    GPU. Give each a fraction (learner_num_gpus 0.5, rollout_num_gpus 0.5) and keep
    engine.gpu_memory_utilization within the engine's fraction. In sync mode the engines sleep
    while the learner trains (vLLM with engine.enable_sleep_mode: weights to CPU memory, KV cache
    freed; transformers: the model moves to CPU) and wake before loading the new version; the
    learner releases its cached GPU memory after each step. Needs learner_num_ranks ==
    num_rollout_workers and weight_sync object_store (NCCL cannot join two ranks on one GPU)."""
    weight_sync: Literal["object_store", "nccl"] = "object_store"
    """How new weights reach the engines. "object_store": one immutable Ray object per version
    (works everywhere, CPU included). "nccl": learner rank 0 broadcasts bucketed bf16 weights into
    every vLLM worker over one NCCL group formed at start-up (GPU, vLLM engines only; 0.05 s for a
    2B model on H200s, see README). Greedy evaluation always uses the object store."""
    weight_sync_bucket_mb: float = 256.0
    """NCCL: size of the flat broadcast buckets in MiB."""
    weight_sync_timeout_s: float = 120.0
    """NCCL: deadline of one sync; on a timeout the engines keep their previous weights and the
    run stops with a clear error."""

    def validate(self) -> None:
        if self.num_rollout_workers < 1:
            raise ConfigError(f"cluster.num_rollout_workers must be >= 1, got {self.num_rollout_workers}")
        if self.learner_num_ranks < 1:
            raise ConfigError(f"cluster.learner_num_ranks must be >= 1, got {self.learner_num_ranks}")
        for name in ("rollout_num_gpus", "rollout_num_cpus", "learner_num_gpus", "learner_num_cpus",
                     "env_server_num_cpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cluster.{name} must be >= 0, got {getattr(self, name)}")
        if self.env_servers_per_worker < 1:
            raise ConfigError(f"cluster.env_servers_per_worker must be >= 1, got {self.env_servers_per_worker}")
        if self.env_placement == "remote" and not self.env_server_urls:
            raise ConfigError("cluster.env_placement is 'remote' but cluster.env_server_urls is empty")
        unknown = sorted(set(self.env_server_tasks) - set(self.env_server_urls))
        if unknown:
            raise ConfigError(f"cluster.env_server_tasks names {unknown}, which are not in cluster.env_server_urls")
        if self.max_staleness < 0:
            raise ConfigError(f"cluster.max_staleness must be >= 0, got {self.max_staleness}")
        if self.groups_per_step < 1:
            raise ConfigError(f"cluster.groups_per_step must be >= 1, got {self.groups_per_step}")
        if self.total_steps < 1:
            raise ConfigError(f"cluster.total_steps must be >= 1, got {self.total_steps}")
        if self.group_timeout_s <= 0 or self.shutdown_timeout_s <= 0:
            raise ConfigError("cluster.group_timeout_s and cluster.shutdown_timeout_s must be > 0")
        if self.max_actor_failures < 0:
            raise ConfigError(f"cluster.max_actor_failures must be >= 0, got {self.max_actor_failures}")
        if self.worker_restart_budget < 0:
            raise ConfigError(f"cluster.worker_restart_budget must be >= 0, got {self.worker_restart_budget}")
        if self.max_failed_groups_in_a_row < 1:
            raise ConfigError(f"cluster.max_failed_groups_in_a_row must be >= 1, got {self.max_failed_groups_in_a_row}")
        for name, amount in self.env_host_resources.items():
            if amount <= 0 or name in ("CPU", "GPU"):
                raise ConfigError(f"cluster.env_host_resources: {name!r} must be a custom resource with an amount > 0")
        if self.worker_restart_window_s <= 0:
            raise ConfigError(f"cluster.worker_restart_window_s must be > 0, got {self.worker_restart_window_s}")
        if self.learner_restart_budget < 0:
            raise ConfigError(f"cluster.learner_restart_budget must be >= 0, got {self.learner_restart_budget}")
        if self.learner_restart_window_s <= 0:
            raise ConfigError(f"cluster.learner_restart_window_s must be > 0, got {self.learner_restart_window_s}")
        if self.weight_sync_bucket_mb <= 0 or self.weight_sync_timeout_s <= 0:
            raise ConfigError("cluster.weight_sync_bucket_mb and cluster.weight_sync_timeout_s must be > 0")


@dataclass
class LoggingConfig:
    """Where the metrics go. metrics.jsonl in the run folder and the Ray dashboard are always on."""

    trackers: list[str] = field(default_factory=list)
    """Extra sinks: any of "trackio" (the seed gist's tracker), "tensorboard", "wandb". Each must
    be installed; a configured but missing one is an error before the run starts."""
    project: str = "bgrpo"
    """Project name in trackio / wandb."""
    ray_metrics: bool = True
    """Export the figures as Ray custom metrics (Ray dashboard, Prometheus endpoint)."""
    progress_bar: bool = True
    """A tqdm progress bar with ETA over learner steps on the console."""
    log_every_steps: int = 1
    """Print a one-line summary every N learner steps."""
    plots: bool = True
    """Write PNG plots of reward, success rate and throughput into the run folder at the end."""
    save_trajectories: bool = True
    """Append every collected group to Parquet (run_dir/trajectories) and write the viewer HTML."""

    def validate(self) -> None:
        allowed = {"trackio", "tensorboard", "wandb"}
        bad = [t for t in self.trackers if t not in allowed]
        if bad:
            raise ConfigError(f"logging.trackers: unknown {bad}; choose from {sorted(allowed)}")
        import importlib.util

        missing = [t for t in self.trackers if importlib.util.find_spec(t) is None]
        if missing:
            raise ConfigError(
                f"logging.trackers {missing} configured but not installed; `pip install {' '.join(missing)}` "
                "or remove them from logging.trackers"
            )
        if self.log_every_steps < 1:
            raise ConfigError(f"logging.log_every_steps must be >= 1, got {self.log_every_steps}")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (model in HF format, optimizer, RNG, policy version, data cursor)."""

    every_steps: int = 0
    """Save every N learner steps (0 = only the final one, if `save_final`)."""
    keep_last: int = 2
    """Keep the newest K checkpoints, delete older ones (0 = keep all)."""
    save_final: bool = True
    """Save a checkpoint when the run ends normally."""

    def validate(self) -> None:
        if self.every_steps < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep_last must be >= 0")


@dataclass
class EvalConfig:
    """Periodic evaluation on held-out seeds with greedy decoding."""

    every_steps: int = 0
    """Evaluate every N learner steps (0 = never during training)."""
    at_end: bool = False
    """Also evaluate after the last step."""
    episodes_per_task: int = 2
    """Episodes per task per evaluation (each on a distinct held-out seed)."""
    greedy: bool = True
    """Greedy decoding (temperature 0) during evaluation; false samples with rollout.sampling."""
    before_training: bool = False
    """Also evaluate before the first learner step (after the warm start): the "before" of a
    before -> after comparison on the same held-out seeds."""
    num_sessions: int = 1
    """Env sessions (browsers) of the evaluation worker: held-out episodes run this many at once."""

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        if self.episodes_per_task < 1:
            raise ConfigError(f"eval.episodes_per_task must be >= 1, got {self.episodes_per_task}")
        if self.num_sessions < 1:
            raise ConfigError(f"eval.num_sessions must be >= 1, got {self.num_sessions}")


@dataclass
class WarmStartConfig:
    """Supervised warm start before GRPO (`bgrpo sft`): scripted-teacher demonstrations on training
    seeds, then completion-only cross-entropy in the learner, then a checkpoint."""

    enabled: bool = False
    """Run the warm start at the start of `bgrpo train` (skipped on --resume)."""
    tasks: list[str] = field(default_factory=list)
    """Tasks to demonstrate (empty = sampler.tasks); each needs a scripted teacher."""
    episodes_per_task: int = 16
    """Demonstration episodes per task, on distinct training seeds."""
    epsilon: float = 0.0
    """Probability that the teacher takes a random valid action at a step (an imperfect teacher)."""
    num_sessions: int = 2
    """Env sessions (browsers) that play demonstrations at once."""
    demos_dir: str = ""
    """Use the demonstrations in this folder (`bgrpo demos --out`) instead of collecting new ones."""
    epochs: int = 1
    """Passes over the training demonstrations."""
    batch_episodes: int = 8
    """Demonstration episodes per SFT optimizer step."""
    lr: float = 1.0e-4
    """SFT learning rate (GRPO then uses learner.lr with a fresh optimizer state)."""
    heldout_fraction: float = 0.2
    """Share of demonstration episodes kept out of training to measure the held-out loss."""

    def validate(self) -> None:
        if self.episodes_per_task < 1 or self.epochs < 1 or self.batch_episodes < 1 or self.num_sessions < 1:
            raise ConfigError("warm_start.episodes_per_task, epochs, batch_episodes and num_sessions must be >= 1")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"warm_start.epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"warm_start.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not self.lr > 0:
            raise ConfigError(f"warm_start.lr must be > 0, got {self.lr}")


@dataclass
class SamplerConfig:
    """Which task instances the rollout workers play: tasks x seeds, train and held-out eval."""

    tasks: list[str] = field(default_factory=lambda: ["miniwob.click-test"])
    """BrowserGym task names ("miniwob.click-test"; the "miniwob." prefix may be left out), or
    the browser-free "recorded.click-button" (with env.task set to it; envs/recorded/)."""
    train_seeds: list[int] = field(default_factory=lambda: [0, 1_000_000])
    """Half-open range [start, stop) of training seeds."""
    eval_seeds: list[int] = field(default_factory=lambda: [1_000_000, 1_001_000])
    """Half-open range [start, stop) of held-out evaluation seeds; must not overlap train_seeds."""
    weighting: Literal["uniform", "learnable"] = "uniform"
    """"learnable" samples tasks with more weight where the recent success rate is in (0, 1),
    where GRPO's group-normalised advantages are non-zero."""
    success_window: int = 32
    """Recent episodes per task used for its success rate."""
    min_weight: float = 0.1
    """Weight of a task whose recent success rate is 0 or 1 (learnable ones weigh 1)."""

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("sampler.tasks is empty")
        for name, rng in (("train_seeds", self.train_seeds), ("eval_seeds", self.eval_seeds)):
            if len(rng) != 2 or rng[0] >= rng[1] or rng[0] < 0:
                raise ConfigError(f"sampler.{name} must be [start, stop) with 0 <= start < stop, got {rng}")
        (a, b), (c, d) = self.train_seeds, self.eval_seeds
        if a < d and c < b:
            raise ConfigError(
                f"sampler.eval_seeds {self.eval_seeds} overlap sampler.train_seeds {self.train_seeds}: "
                "held-out seeds must be disjoint from training seeds"
            )
        if self.success_window < 1:
            raise ConfigError(f"sampler.success_window must be >= 1, got {self.success_window}")
        if not 0.0 < self.min_weight <= 1.0:
            raise ConfigError(f"sampler.min_weight must be in (0, 1], got {self.min_weight}")


# --- the root ---------------------------------------------------------------------------------------

# How pydantic reads the tree (the nested sub-configs inherit it): the docstring under each field is
# its description (`bgrpo train --help`), an unknown key is an error, and a number given for a
# string field (e.g. a run name 007 read by YAML as 7) is kept as text.
PYDANTIC_CONFIG = ConfigDict(use_attribute_docstrings=True, extra="forbid", coerce_numbers_to_str=True)


@with_config(PYDANTIC_CONFIG)
@dataclass
class TrainConfig:
    """Everything a training run needs; `bgrpo train --help` lists every field with its docstring."""

    model: str = "tiny-vlm"
    """Model to train: a Hugging Face id or folder ("Qwen/Qwen3-VL-2B-Instruct"), or "tiny-vlm"
    / "tiny-lm" for the tiny random models built offline (actors.tiny_models), or
    "random-qwen3-vl-2b" for a random model of Qwen3-VL-2B's exact shape built offline (GPU)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray connection, actor counts and resources, sync/async loop, steps, seed, run folder."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """BrowserGym env servers (envs/browsergym)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout workers: episodes, G, sampling (actors/)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Inference engine: vLLM or transformers (actors/engines)."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Optimizer, precision, distributed strategy, weight sync (learner/)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO loss with TRL's names (learner/)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks, progress bar, plots, trajectory files."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic greedy evaluation on held-out seeds."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Tasks and seeds."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    """Supervised warm start from scripted demonstrations before GRPO."""

