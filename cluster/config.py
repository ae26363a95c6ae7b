"""The root configuration: one dataclass tree, YAML presets, dotted CLI overrides, env-var overrides.

    TrainConfig
      cluster     ClusterConfig      (here)  Ray address, workers, GPUs, placement, sync/async, steps
      env         EnvConfig          (envs.browsergym.config, placeholder until it lands)
      rollout     RolloutConfig      (actors.config)
      engine      EngineConfig       (actors.engines.config / actors.config)
      learner     LearnerConfig      (learner.config)
      grpo        GRPOConfig         (learner.config)
      logging     LoggingConfig      (here)  metrics.jsonl, trackio / tensorboard / wandb, progress bar
      checkpoint  CheckpointConfig   (here)  every N steps, keep last K
      eval        EvalConfig         (here)  every N steps, held-out seeds, greedy
      sampler     SamplerConfig      (here)  tasks, train vs eval seeds, success-rate weighting

Precedence, lowest first: dataclass defaults < preset YAML (`--config NAME|PATH`) < the seed
gist's environment variables (`ENV_OVERRIDES`) < dotted command-line overrides (`--learner.lr 1e-6`).
Every value is type-checked against its field's annotation, and `validate_config` runs every
sub-config's own `validate()` plus the cross-field checks before anything starts. The machinery is
generic over dataclasses, so the sub-configs owned by other layers plug in unchanged.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "configs"


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
    """Rollout-worker failures (crash or timeout) tolerated before the run stops with an error."""
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


# --- sub-configs owned by other layers (composed by import) ---------------------------------------


@dataclass
class _PlaceholderConfig:
    """Stands in for a layer's config class until it lands; accepts no keys."""

    def validate(self) -> None:
        pass


def _import_config(candidates: list[tuple[str, str]]) -> type:
    """The first importable class among `(module, name)` candidates, else the placeholder."""
    for module_name, class_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, class_name, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            return cls
    return _PlaceholderConfig


EnvConfig = _import_config([("envs.browsergym.config", "EnvConfig"), ("envs.browsergym.config", "BrowserGymEnvConfig")])
RolloutConfig = _import_config([("actors.config", "RolloutConfig")])
EngineConfig = _import_config([("actors.engines.config", "EngineConfig"), ("actors.config", "EngineConfig")])
LearnerConfig = _import_config([("learner.config", "LearnerConfig")])
GRPOConfig = _import_config([("learner.config", "GRPOConfig")])


@dataclass
class TrainConfig:
    """Everything a training run needs; `bgrpo train --help` lists every field with its docstring."""

    model: str = "tiny-vlm"
    """Model to train: a Hugging Face id or folder ("Qwen/Qwen3-VL-2B-Instruct"), or "tiny-vlm"
    / "tiny-lm" for the tiny random models built offline (actors.tiny_models), or
    "random-qwen3-vl-2b" for a random model of Qwen3-VL-2B's exact shape built offline (GPU)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray connection, actor counts and resources, sync/async loop, steps, seed, run folder."""
    env: EnvConfig = field(default_factory=EnvConfig)  # type: ignore[valid-type]
    """BrowserGym env servers (envs/browsergym)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # type: ignore[valid-type]
    """Rollout workers: episodes, G, sampling (actors/)."""
    engine: EngineConfig = field(default_factory=EngineConfig)  # type: ignore[valid-type]
    """Inference engine: vLLM or transformers (actors/engines)."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)  # type: ignore[valid-type]
    """Optimizer, precision, distributed strategy, weight sync (learner/)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # type: ignore[valid-type]
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


# --- the seed gist's environment variables ---------------------------------------------------------

# The seed gist configured its run with these environment variables; they keep working as overrides
# (applied after the preset, before command-line flags). Each maps to ONE field; a variable whose
# field a layer does not have (yet) is reported as an error when set, never silently ignored.
ENV_OVERRIDES: dict[str, str] = {
    "MODEL_ID": "model",                                # the model to train and sample from
    "NUM_GENERATIONS": "grpo.num_generations",          # G, episodes per GRPO group
    "MAX_STEPS": "rollout.max_steps",                   # env steps per episode
    "MAX_NEW_TOKENS": "rollout.sampling.max_new_tokens",  # tokens per action
    "TEMPERATURE": "rollout.sampling.temperature",      # sampling temperature
    "TOP_K": "rollout.sampling.top_k",                  # sampling top-k
    "TOP_P": "rollout.sampling.top_p",                  # sampling top-p
    "LEARNING_RATE": "learner.lr",                      # optimizer learning rate
    "WEIGHT_DECAY": "learner.weight_decay",             # AdamW weight decay
    "WARMUP_STEPS": "learner.warmup_steps",             # linear warm-up steps
    "GRADIENT_ACCUMULATION_STEPS": "cluster.groups_per_step",  # see below
    "GRAD_ACCUM_STEPS": "cluster.groups_per_step",     # the gist's name for the same knob
    "PER_DEVICE_BATCH_SIZE": "learner.micro_batch_size",  # samples per forward/backward pass
    "SAVE_INTERVAL": "checkpoint.every_steps",          # checkpoint every N learner steps
    "FALLBACK_ACTION": "rollout.fallback_action",       # action sent when the completion has none
    "MAX_DOM_CHARS": "rollout.prompt.max_axtree_chars",  # page text cut to this many characters
    "BETA": "grpo.beta",                                # KL coefficient
    "LOSS_TYPE": "grpo.loss_type",
    "NUM_ROLLOUT_WORKERS": "cluster.num_rollout_workers",
    "NUM_TRAIN_STEPS": "cluster.total_steps",           # learner steps in the run
    "TASKS": "sampler.tasks",                           # comma-separated task names
    "SEED": "cluster.seed",
    "OUTPUT_DIR": "cluster.run_dir",
}
# GRADIENT_ACCUMULATION_STEPS: in the gist (TRL, per-device batch = G) one optimizer step took
# `gradient_accumulation_steps` groups; here the learner takes `cluster.groups_per_step` whole
# groups per step and splits them into micro-batches itself, so the gist's value is the group count.
# PER_DEVICE_BATCH_SIZE: TRL's samples per forward/backward pass, i.e. the learner's micro-batch
# (here it does not change the step's batch, which is groups_per_step * G; the loss denominators
# are taken over the whole batch, so the micro-batch size changes memory, not the gradient).

# BROWSERGYM_BASE_URL (the gist's one env server; here a comma-separated list) sets two fields:
# the URLs, and the placement that uses them.
ENV_REMOTE_SERVERS = "BROWSERGYM_BASE_URL"

# Variables the gist reads that have no equivalent here: setting one is an error that says what to
# use instead, never a silent no-op. DEBUG is refused only when it asks for debugging (the gist's
# "1"/"true"/"yes"); its "off" values need nothing.
_SHAPING_REFUSAL = ("the seed gist's dense reward shaping is not implemented (the episode return is the "
                    "environment's reward); the nearest knobs are rollout.invalid_action_penalty and "
                    "rollout.step_penalty")
ENV_REFUSED: dict[str, str] = {
    "VLLM_ENDPOINT": "engines run inside the rollout workers, there is no external vLLM server to point at; "
                     "set engine.backend vllm (each worker starts its own engine) and unset VLLM_ENDPOINT",
    "NUM_EPOCHS": "a run is measured in learner steps, not epochs over a dataset; set NUM_TRAIN_STEPS "
                  "(cluster.total_steps) and unset NUM_EPOCHS",
    "DATASET_SIZE": "task instances are drawn from seed ranges, not a fixed-size dataset; set "
                    "sampler.train_seeds ([start, stop)) and NUM_TRAIN_STEPS, and unset DATASET_SIZE",
    "DEBUG": "every step's prompt, screenshot, action and reward are already written to the run folder "
             "(trajectories/ Parquet with logging.save_trajectories, viewer/ HTML with rollout.write_viewer); "
             "unset DEBUG (or set it to 0)",
    "STEP_DENSE_WEIGHT": _SHAPING_REFUSAL,
    "SHAPING_NOOP_PENALTY": _SHAPING_REFUSAL,
    "SHAPING_ERROR_PENALTY": _SHAPING_REFUSAL,
    "SHAPING_REPEAT_ACTION_PENALTY": _SHAPING_REFUSAL,
    "SHAPING_NOVEL_CLICK_BONUS": _SHAPING_REFUSAL,
    "SHAPING_REPEAT_CLICK_PENALTY": _SHAPING_REFUSAL,
    "SHAPING_NOVEL_TEXT_BONUS": _SHAPING_REFUSAL,
    "SHAPING_REPEAT_TEXT_PENALTY": _SHAPING_REFUSAL,
}
_ENV_OFF_VALUES = {"DEBUG": {"0", "false", "no"}}

# Fields of other layers' configs that the driver derives from one source of truth, so they cannot
# disagree: target -> (source, how). Setting a target to anything but its default is an error.
DERIVED_FIELDS: dict[str, str] = {
    "learner.model_path": "model",
    "learner.grpo": "grpo",
    "learner.total_steps": "cluster.total_steps",
    "learner.num_ranks": "cluster.learner_num_ranks",
    "learner.seed": "cluster.seed",
    "learner.keep_checkpoints": "checkpoint.keep_last",
    "engine.model": "model",
    "engine.seed": "cluster.seed",
    "env.max_steps": "rollout.max_steps",
    "learner.release_memory_after_step": "cluster.colocate",
    # The learner scores with the distribution the engine samples from (learner/logprobs.py), and
    # dr_grpo normalises by the generation limit (TRL's max_completion_length).
    "grpo.temperature": "rollout.sampling.temperature",
    "grpo.top_k": "rollout.sampling.top_k",
    "grpo.top_p": "rollout.sampling.top_p",
    "grpo.max_completion_length": "rollout.sampling.max_new_tokens",
}


# --- generic dataclass machinery ------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (`name: type = x` then `\"\"\"doc\"\"\"`)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    module = importlib.import_module(cls.__module__)
    return typing.get_type_hints(cls, vars(module))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks `value` against the annotation `tp`, converting only where it is lossless
    (an int for a float field, a comma-separated string for a list from an env var)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric run name from YAML
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Builds dataclass `cls` from a (nested) mapping; unknown keys are errors with a suggestion."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {(path + '.' if path else '') + close[0]}?)" if close else ""
            known = ", ".join(names) if names else "none: this layer's config has not landed yet"
            raise ConfigError(f"unknown config key {full!r}{hint}; known keys: {known}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            # A partial section starts from the parent's default for it (its default_factory may
            # differ from the section class's own defaults), not from the bare class.
            value = _merge(to_dict(_field_default(cls, key)), value)
        kwargs[key] = coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a layer's __post_init__ check
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data (dicts, lists, scalars) from a config tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_type_at(path: str) -> Any:
    """The annotation of the field at dotted `path` in TrainConfig, or ConfigError."""
    cls: Any = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key {path!r}: {'.'.join(parts[:i])} has no sub-fields")
        hints = _hints(cls)
        if part not in hints:
            prefix = ".".join(parts[:i])
            names = list(hints)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}")
        cls = hints[part]
    return cls


def _set_dotted(tree: dict, path: str, value: Any) -> None:
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {path!r}: {part} is not a section")
    node[parts[-1]] = value


def parse_value(text: str, tp: Any) -> Any:
    """A command-line or env-var string as YAML (so 1e-6, true, [a, b] work), kept a string
    for string fields so a run name like "007" is not turned into 7."""
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-6" (no dot) as a string; a float field wants the number.
    if isinstance(value, str) and tp is float:
        try:
            return float(value)
        except ValueError:
            return value
    return value


# --- presets ---------------------------------------------------------------------------------------

# The `local` preset embedded in code, so `bgrpo train` works from an installed package without the
# configs/ folder. configs/local.yaml holds the same content (a test keeps them equal).
EMBEDDED_LOCAL_PRESET = """\
# local: the main job, a learning run that finishes in minutes on 2 CPU cores. A tiny Qwen3 built
# offline reading the accessibility tree; a short supervised warm start on deliberately imperfect
# demonstrations (a scripted teacher that clicks a random button 80 % of the time); then GRPO on
# real MiniWoB click-test-2 ("Click button ONE." next to a TWO button, both at random places) in
# real Chromium; and the same held-out seeds evaluated before and after GRPO with sampling
# (temperature 1), so the before -> after difference is what GRPO changed in the policy, with its
# 95 % interval. Text, not the screenshot: click-test-2's tree is the same on every seed, so the
# warm start learns the teacher's preference (~60/40) instead of memorising screenshots, which
# made the tiny VLM copy the majority action with full confidence on unseen seeds.
model: tiny-lm
cluster:
  num_cpus: 8
  num_rollout_workers: 2
  rollout_num_cpus: 1
  learner_num_cpus: 1
  env_placement: embedded
  mode: sync
  max_staleness: 1
  groups_per_step: 2
  total_steps: 8
  seed: 0
engine:
  backend: transformers
  device: cpu
  max_model_len: 2048
rollout:
  num_sessions: 1
  max_steps: 1
  allowed_actions: [noop, click]
  prompt:
    include_screenshot: false
    include_axtree: true
    max_clickable_elements: 0
  sampling:
    temperature: 1.0
    top_k: 0
    max_new_tokens: 16
grpo:
  num_generations: 4
learner:
  lr: 2.0e-3
  micro_batch_size: 8
checkpoint:
  every_steps: 0
  keep_last: 2
warm_start:
  enabled: true
  episodes_per_task: 16
  epsilon: 0.8
  num_sessions: 2
  epochs: 8
  batch_episodes: 4
  lr: 2.0e-3
  heldout_fraction: 0.25
eval:
  every_steps: 0
  before_training: true
  at_end: true
  greedy: false
  episodes_per_task: 40
  num_sessions: 2
sampler:
  tasks: [miniwob.click-test-2]
logging:
  progress_bar: true
"""


def preset_names() -> list[str]:
    names = {p.stem for p in PRESETS_DIR.glob("*.yaml")} if PRESETS_DIR.is_dir() else set()
    return sorted(names | {"local"})


def load_preset(name_or_path: str) -> dict:
    """The preset's mapping: a path to a YAML file, or a name looked up in configs/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
    else:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            if name_or_path == "local":
                return yaml.safe_load(EMBEDDED_LOCAL_PRESET) or {}
            raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections, got {type(data).__name__}")
    return data


def build_config(
    preset: str | None = "local",
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TrainConfig:
    """Preset < env vars (ENV_OVERRIDES) < dotted overrides (strings, parsed as YAML and checked)."""
    tree = load_preset(preset) if preset else {}
    _drop_resolved_derived(tree)
    env = os.environ if environ is None else environ
    _apply_env_overrides(tree, env)
    for dotted, text in (overrides or {}).items():
        tp = _field_type_at(dotted)
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"--{dotted} is a section; set its fields, e.g. --{dotted}.<field> VALUE")
        _set_dotted(tree, dotted, parse_value(text, tp) if isinstance(text, str) else text)
    config = resolve_derived(from_dict(TrainConfig, tree))
    _refuse_explicit_derived(tree, config)
    return config


def _refuse_explicit_derived(tree: dict, config: TrainConfig) -> None:
    """resolve_derived only sees values that differ from the field's default; a preset or flag
    that sets a derived field explicitly to its default (e.g. grpo.max_completion_length: 512
    beside max_new_tokens 16) would be overwritten silently. Refuse it too."""
    for target, source in DERIVED_FIELDS.items():
        node: Any = tree
        for part in target.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING or isinstance(node, dict) or target == "learner.keep_checkpoints":
            continue
        if _has_dotted(config, target) and node != _get_dotted(config, target):
            raise ConfigError(f"{target} is derived from {source}; set {source} instead "
                              f"(got {node!r} vs {_get_dotted(config, target)!r})")


_MISSING = object()


def _apply_env_overrides(tree: dict, env: Mapping[str, str]) -> None:
    """The seed gist's environment variables into the preset tree: each one honoured (ENV_OVERRIDES,
    ENV_REMOTE_SERVERS) or refused with the alternative (ENV_REFUSED); two names of one field must agree."""
    for var, why in ENV_REFUSED.items():
        value = env.get(var, "").strip()
        if value and value.lower() not in _ENV_OFF_VALUES.get(var, set()):
            raise ConfigError(f"environment variable {var}={value!r} is not supported: {why}")
    set_by: dict[str, tuple[str, Any]] = {}
    for var, dotted in ENV_OVERRIDES.items():
        if var in env and env[var] != "":
            try:
                tp = _field_type_at(dotted)
            except ConfigError as e:
                raise ConfigError(f"environment variable {var} maps to {dotted!r}, which does not exist: {e}") from e
            value = parse_value(env[var], tp)
            if dotted in set_by and set_by[dotted][1] != value:
                other, seen = set_by[dotted]
                raise ConfigError(f"environment variables {var}={value!r} and {other}={seen!r} both set {dotted}; "
                                  "set one of them")
            set_by[dotted] = (var, value)
            _set_dotted(tree, dotted, value)
    urls = [u.strip() for u in env.get(ENV_REMOTE_SERVERS, "").split(",") if u.strip()]
    if urls:
        _set_dotted(tree, "cluster.env_server_urls", urls)
        _set_dotted(tree, "cluster.env_placement", "remote")


def _get_dotted(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_dotted(obj: Any, path: str) -> bool:
    try:
        _get_dotted(obj, path)
        return True
    except AttributeError:
        return False


def _drop_resolved_derived(tree: dict) -> None:
    """A resolved config (run_dir/config.yaml) holds the derived copies too; drop those that still
    equal their source, so an override of the source (e.g. on --resume) is not a conflict."""
    missing = object()

    def lookup(path: str) -> Any:
        node: Any = tree
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return missing
            node = node[part]
        return node

    for target, source in DERIVED_FIELDS.items():
        value, src = lookup(target), lookup(source)
        if value is missing:
            continue
        if src is not missing and (value == src or (target == "learner.keep_checkpoints" and src == 0)):
            section, _, name = target.rpartition(".")
            del lookup(section)[name]


def resolve_derived(config: TrainConfig) -> TrainConfig:
    """Fills DERIVED_FIELDS from their sources (in place); a target set by hand to a different value
    is an error that names the field to set instead."""
    sources = dict(DERIVED_FIELDS)
    for target, source in sources.items():
        section, _, name = target.rpartition(".")
        if not _has_dotted(config, target):
            continue  # that layer's config has no such field (placeholder or renamed)
        owner = _get_dotted(config, section)
        value = _get_dotted(config, source)
        if target == "learner.keep_checkpoints" and value == 0:
            value = 1_000_000  # keep_last 0 = keep all
        current = getattr(owner, name)
        default = type(owner)()
        if current != getattr(default, name) and current != value:
            raise ConfigError(f"{target} is derived from {source}; set {source} instead (got {current!r} vs {value!r})")
        setattr(owner, name, value)
    if _has_dotted(config, "learner.device"):
        config.learner.device = "cuda" if config.cluster.learner_num_gpus > 0 else "cpu"
    return config


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Writes the resolved config as YAML (atomically) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(resolved_yaml(config))
    os.replace(tmp, path)
    return path


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Reads a resolved config written by `save_config` (e.g. from a run folder to resume)."""
    return resolve_derived(from_dict(TrainConfig, load_preset(str(path))))


# --- validation ------------------------------------------------------------------------------------


def miniwob_task_names() -> set[str]:
    """Task ids in BrowserGym's MiniWoB registry ("miniwob.click-test", ...)."""
    from browsergym.miniwob import ALL_MINIWOB_TASKS

    return {t.get_task_id() for t in ALL_MINIWOB_TASKS}


def normalize_task(name: str) -> str:
    """'click-test' -> 'miniwob.click-test'; names with a benchmark prefix stay as they are."""
    name = name.removeprefix("browsergym/")
    return name if "." in name else f"miniwob.{name}"


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """First attribute present among `names` (the other layers' field names may vary)."""
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def num_generations(config: TrainConfig) -> int | None:
    """G: episodes per GRPO group (from grpo, else rollout)."""
    return _get(config.grpo, "num_generations") or _get(config.rollout, "num_generations", "group_size")


def validate_config(config: TrainConfig) -> None:
    """Every sub-config's own validate() and the cross-field checks. Raises ConfigError."""
    # First: these name the field to change, where a derived copy's own check would not.
    _validate_training_semantics(config)
    for f in dataclasses.fields(config):
        sub = getattr(config, f.name)
        check = getattr(sub, "validate", None)
        if callable(check):
            try:
                check()
            except ConfigError:
                raise
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{f.name}: {e}") from e
    if not config.model:
        raise ConfigError("model is empty")
    if config.cluster.env_placement == "ray_actors" and config.eval.num_sessions > config.env.max_sessions:
        # The evaluation's own env-server host runs one server (driver `_eval_env_urls`).
        raise ConfigError(f"eval.num_sessions ({config.eval.num_sessions}) > env.max_sessions "
                          f"({config.env.max_sessions}): the evaluation's env server would refuse sessions")
    # tasks must exist in BrowserGym's registry: a typo would otherwise fail minutes later in a worker.
    from envs.recorded.environment import TASKS as RECORDED_TASKS, is_recorded_task

    tasks = [normalize_task(t) for t in config.sampler.tasks]
    # One env server runs either BrowserGym or the browser-free recorded page, chosen by env.task.
    if any(is_recorded_task(t) for t in tasks) and hasattr(config.env, "task"):
        if not all(is_recorded_task(t) for t in tasks):
            raise ConfigError("sampler.tasks mixes recorded.* tasks with BrowserGym tasks; one run uses one kind")
        if not is_recorded_task(config.env.task):
            raise ConfigError(f"sampler.tasks are recorded tasks: set --env.task {tasks[0]} so the env "
                              "servers replay them instead of starting browsers")
        unknown = sorted(set(tasks) - set(RECORDED_TASKS))
        if unknown:
            raise ConfigError(f"sampler.tasks: unknown recorded task(s) {unknown}; known: {list(RECORDED_TASKS)}")
    known = miniwob_task_names() if any(t.startswith("miniwob.") for t in tasks) else set()
    for task, t in zip(config.sampler.tasks, tasks):
        if t.startswith("miniwob.") and t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"sampler.tasks: unknown MiniWoB task {task!r}{hint}")
    if config.warm_start.enabled:
        from cluster.warm_start import check_teachers

        check_teachers(config)
    # G must agree wherever it is configured, and be >= 2 (a group of one has no advantage).
    gs = {n: v for n, v in (("grpo.num_generations", _get(config.grpo, "num_generations")),
                            ("rollout.num_generations", _get(config.rollout, "num_generations", "group_size")))
          if v is not None}
    if len(set(gs.values())) > 1:
        raise ConfigError(f"num_generations disagree: {gs}; set one value (e.g. --grpo.num_generations)")
    g = next(iter(gs.values()), None)
    if g is not None and g < 2:
        raise ConfigError(f"num_generations must be >= 2 (GRPO normalises rewards within a group), got {g}")
    # The learner's batch: groups_per_step * G samples must split evenly into micro-batches.
    accum = _get(config.learner, "gradient_accumulation_steps")
    if g is not None and accum:
        samples = config.cluster.groups_per_step * g
        if samples % accum:
            raise ConfigError(
                f"cluster.groups_per_step * num_generations = {samples} episodes per step is not divisible "
                f"by learner.gradient_accumulation_steps = {accum}"
            )
    if config.cluster.learner_num_ranks > 1 and config.cluster.groups_per_step % config.cluster.learner_num_ranks:
        raise ConfigError(
            f"cluster.groups_per_step ({config.cluster.groups_per_step}) must be divisible by "
            f"cluster.learner_num_ranks ({config.cluster.learner_num_ranks}) so every rank gets whole groups"
        )
    if config.cluster.weight_sync == "nccl":
        # NCCL needs a CUDA device at both ends and vLLM's worker extension on the receiving end.
        engine_kind = _get(config.engine, "backend")
        if engine_kind != "vllm":
            raise ConfigError(f"cluster.weight_sync nccl needs engine.backend vllm, got {engine_kind!r}")
        if config.cluster.rollout_num_gpus < 1 or config.cluster.learner_num_gpus < 1:
            raise ConfigError(
                "cluster.weight_sync nccl needs whole GPUs for the learner and each rollout worker "
                f"(learner_num_gpus={config.cluster.learner_num_gpus}, "
                f"rollout_num_gpus={config.cluster.rollout_num_gpus}); use object_store on CPU"
            )
    _validate_colocation(config)
    if config.cluster.mode == "sync" and config.cluster.max_staleness < 0:
        raise ConfigError("cluster.max_staleness must be >= 0")
    if config.cluster.env_placement == "remote" and config.cluster.env_server_tasks:
        # Every sampled task needs a server that serves it (an unlisted URL serves every task).
        served = {normalize_task(t) for ts in config.cluster.env_server_tasks.values() for t in ts}
        if not set(config.cluster.env_server_urls) - set(config.cluster.env_server_tasks):
            missing = [t for t in tasks if t not in served]
            if missing:
                raise ConfigError(f"sampler.tasks {missing} are served by no URL in cluster.env_server_tasks; "
                                  "start a server for each (README: remote env servers) and list it")
    if config.eval.every_steps or config.eval.at_end:
        start, stop = config.sampler.eval_seeds
        if stop - start < config.eval.episodes_per_task:
            raise ConfigError(
                f"sampler.eval_seeds has {stop - start} seeds, fewer than eval.episodes_per_task "
                f"({config.eval.episodes_per_task})"
            )


def _validate_training_semantics(config: TrainConfig) -> None:
    """Combinations that would train without an error but on the wrong numbers."""
    sampling = config.rollout.sampling
    if sampling.temperature <= 0:
        raise ConfigError(
            f"rollout.sampling.temperature is {sampling.temperature} (greedy): GRPO needs sampled "
            "completions, and grpo.temperature (derived from it) must be > 0; greedy decoding is for "
            "evaluation (eval.greedy)"
        )
    if sampling.seed is not None:
        raise ConfigError(
            f"rollout.sampling.seed is {sampling.seed}: a fixed per-call seed makes the G episodes of "
            "a group sample the same completions (zero advantage); leave it unset (engine.seed seeds "
            "the engine once)"
        )
    max_model_len = _get(config.engine, "max_model_len")
    if max_model_len is not None and sampling.max_new_tokens >= max_model_len:
        raise ConfigError(
            f"rollout.sampling.max_new_tokens ({sampling.max_new_tokens}) must be below "
            f"engine.max_model_len ({max_model_len}): the engine would cut every completion short "
            "while grpo.max_completion_length (derived) still normalises by the full limit"
        )
    if _get(config.learner, "dtype") == "float16":
        raise ConfigError(
            "learner.dtype float16 autocast has no loss scaling here: small gradients underflow to 0 "
            "silently; use bfloat16"
        )
    if config.cluster.mode != "sync" and not config.grpo.vllm_importance_sampling_correction:
        raise ConfigError(
            f"cluster.mode {config.cluster.mode} with grpo.vllm_importance_sampling_correction false: "
            "stale samples (up to cluster.max_staleness versions old) would be trained as if "
            "on-policy; keep the correction on, or use cluster.mode sync"
        )


def _validate_colocation(config: TrainConfig) -> None:
    c = config.cluster
    sleep_mode = bool(_get(config.engine, "enable_sleep_mode", default=False))
    if sleep_mode and _get(config.engine, "backend") == "vllm" and c.rollout_num_gpus <= 0:
        raise ConfigError("engine.enable_sleep_mode needs vLLM on a GPU (cluster.rollout_num_gpus > 0)")
    if not c.colocate:
        return
    if c.learner_num_ranks != c.num_rollout_workers:
        raise ConfigError(f"cluster.colocate pairs learner rank i with rollout worker i: learner_num_ranks "
                          f"({c.learner_num_ranks}) must equal num_rollout_workers ({c.num_rollout_workers})")
    if c.weight_sync != "object_store":
        raise ConfigError("cluster.colocate needs weight_sync object_store: NCCL cannot join two ranks on one GPU")
    if c.learner_num_gpus + c.rollout_num_gpus > 1:
        raise ConfigError(f"cluster.colocate shares one GPU: learner_num_gpus + rollout_num_gpus must be <= 1, "
                          f"got {c.learner_num_gpus:g} + {c.rollout_num_gpus:g}")
    if c.rollout_num_gpus > 0 and _get(config.engine, "backend") == "vllm":
        util = float(_get(config.engine, "gpu_memory_utilization", default=0.0))
        if util > c.rollout_num_gpus:
            raise ConfigError(f"cluster.colocate: engine.gpu_memory_utilization ({util:g}) is vLLM's share of the "
                              f"whole GPU and must fit the engine's fraction rollout_num_gpus ({c.rollout_num_gpus:g})")
    if sleep_mode and c.mode != "sync":
        raise ConfigError("engine.enable_sleep_mode with cluster.colocate needs cluster.mode sync: engines can "
                          "only sleep while no episode runs")


# --- help ------------------------------------------------------------------------------------------


def iter_fields(cls: type = TrainConfig, prefix: str = ""):
    """(dotted name, type, default, docstring) for every leaf field of the tree."""
    hints = _hints(cls)
    docs = field_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, name + ".")
        else:
            yield name, tp, getattr(instance, f.name), docs.get(f.name, "")


def help_text() -> str:
    lines = ["Config fields (set with --<name> VALUE; values are YAML: 1e-6, true, [a, b]):", ""]
    for name, tp, default, doc in iter_fields():
        lines.append(f"  --{name} ({_type_name(tp)}, default {default!r})")
        if doc:
            lines.extend("      " + ln for ln in textwrap.wrap(doc, 92))
    lines += ["", "Environment variables (the seed gist's names) override the preset:"]
    lines += [f"  {var:<30} -> {path}" for var, path in ENV_OVERRIDES.items()]
    lines += [f"  {ENV_REMOTE_SERVERS:<30} -> cluster.env_server_urls (comma-separated) + cluster.env_placement remote"]
    lines += [f"  {var:<30} refused: {why}" for var, why in ENV_REFUSED.items()]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------


@dataclass
class CommandLine:
    """What `bgrpo train` was asked to do."""

    config: TrainConfig
    preset: str
    resume: str | None = None
    help: bool = False
    dry_run: bool = False
    """--dry-run: validate, print `resolved_yaml(config)` and exit without starting Ray."""


def parse_cli(argv: list[str], environ: Mapping[str, str] | None = None) -> CommandLine:
    """`--config NAME|PATH [--resume RUN_DIR] [--dry-run] [--a.b VALUE | --a.b=VALUE ...] [--help]`.

    With --resume and no --config, the run folder's resolved config is the base, so a resumed run
    continues with exactly the settings it started with (overrides still apply on top).
    """
    preset: str | None = None
    resume: str | None = None
    overrides: dict[str, str] = {}
    args = list(argv)
    dry_run = "--dry-run" in args  # the one flag without a value
    args = [a for a in args if a != "--dry-run"]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            return CommandLine(config=TrainConfig(), preset=preset or "local", help=True)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --config local or --learner.lr 1e-6")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if key == "config":
            preset = value
        elif key == "resume":
            resume = value
        else:
            if key in overrides:
                raise ConfigError(f"--{key} given twice")
            overrides[key] = value
    if resume is not None:
        resolved = Path(resume) / "config.yaml"
        if not resolved.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there (not a run folder?)")
        base = preset or str(resolved)
        config = build_config(base, {**overrides}, environ)
        config.cluster.run_dir = str(Path(resume))
    else:
        config = build_config(preset or "local", overrides, environ)
    validate_config(config)
    return CommandLine(config=config, preset=preset or ("resume" if resume else "local"), resume=resume,
                       dry_run=dry_run)


def resolved_yaml(config: TrainConfig) -> str:
    """The resolved configuration as YAML, derived fields included: what `bgrpo train --dry-run`
    prints and what a run saves as `<run_dir>/config.yaml`."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
