"""`validate_config`: every sub-config's own `validate()`, then the checks across sub-configs, before
anything starts. Each raises ConfigError with a message that names the field to change."""

from __future__ import annotations

import dataclasses
import difflib

from cluster.config.schema import ConfigError, TrainConfig

# The task registries (BrowserGym's MiniWoB, the recorded pages, the scripted teachers) are imported
# inside the checks that read them: they pull in gym and OpenEnv (~5 s), which `--help` never needs.


def miniwob_task_names() -> set[str]:
    """Task ids in BrowserGym's MiniWoB registry ("miniwob.click-test", ...)."""
    from browsergym.miniwob import ALL_MINIWOB_TASKS

    return {t.get_task_id() for t in ALL_MINIWOB_TASKS}


def normalize_task(name: str) -> str:
    """'click-test' -> 'miniwob.click-test'; names with a benchmark prefix stay as they are."""
    name = name.removeprefix("browsergym/")
    return name if "." in name else f"miniwob.{name}"


def num_generations(config: TrainConfig) -> int:
    """G: episodes per GRPO group."""
    return config.grpo.num_generations


def warm_start_tasks(config: TrainConfig) -> list[str]:
    """The tasks the warm start demonstrates (warm_start.tasks, else sampler.tasks)."""
    return [normalize_task(t) for t in (config.warm_start.tasks or config.sampler.tasks)]


def validate_config(config: TrainConfig) -> None:
    """Every sub-config's own validate() and the cross-field checks. Raises ConfigError."""
    # First: these name the field to change, where a derived copy's own check would not.
    _check_training_semantics(config)
    _check_weight_update(config)
    _check_sections(config)
    if not config.model:
        raise ConfigError("model is empty")
    _check_tasks(config)
    _check_groups(config)
    _check_weight_sync(config)
    _check_colocation(config)
    _check_env_servers(config)
    _check_eval(config)


def _check_sections(config: TrainConfig) -> None:
    for f in dataclasses.fields(config):
        check = getattr(getattr(config, f.name), "validate", None)
        if not callable(check):
            continue
        try:
            check()
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{f.name}: {e}") from e


def _check_training_semantics(config: TrainConfig) -> None:
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
    max_model_len = config.engine.max_model_len
    if max_model_len is not None and sampling.max_new_tokens >= max_model_len:
        raise ConfigError(
            f"rollout.sampling.max_new_tokens ({sampling.max_new_tokens}) must be below "
            f"engine.max_model_len ({max_model_len}): the engine would cut every completion short "
            "while grpo.max_completion_length (derived) still normalises by the full limit"
        )
    if config.learner.dtype == "float16":
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


def _check_tasks(config: TrainConfig) -> None:
    """Tasks must exist in their registry: a typo would otherwise fail minutes later in a worker."""
    from envs.recorded.environment import TASKS as RECORDED_TASKS, is_recorded_task

    tasks = [normalize_task(t) for t in config.sampler.tasks]
    # One env server runs either BrowserGym or the browser-free recorded page, chosen by env.task.
    if any(is_recorded_task(t) for t in tasks):
        if not all(is_recorded_task(t) for t in tasks):
            raise ConfigError("sampler.tasks mixes recorded.* tasks with BrowserGym tasks; one run uses one kind")
        if not is_recorded_task(config.env.task):
            raise ConfigError(f"sampler.tasks are recorded tasks: set --env.task {tasks[0]} so the env "
                              "servers replay them instead of starting browsers")
        unknown = sorted(set(tasks) - set(RECORDED_TASKS))
        if unknown:
            raise ConfigError(f"sampler.tasks: unknown recorded task(s) {unknown}; known: {list(RECORDED_TASKS)}")
    named = [("sampler.tasks", task) for task in config.sampler.tasks] + [("env.task", config.env.task)]
    known = miniwob_task_names() if any(normalize_task(t).startswith("miniwob.") for _, t in named) else set()
    for field, task in named:
        t = normalize_task(task)
        if t.startswith("miniwob.") and t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{field}: unknown MiniWoB task {task!r}{hint}")
    if is_recorded_task(config.env.task) and normalize_task(config.env.task) not in RECORDED_TASKS:
        raise ConfigError(f"env.task: unknown recorded task {config.env.task!r}; known: {list(RECORDED_TASKS)}")
    if config.warm_start.enabled:
        check_teachers(config)


def check_teachers(config: TrainConfig) -> None:
    """Every warm-start task needs a scripted teacher, unless the demonstrations are given."""
    from envs.browsergym.scripted import SCRIPTED_TASKS

    if config.warm_start.demos_dir:
        return
    missing = [t for t in warm_start_tasks(config) if t not in SCRIPTED_TASKS]
    if missing:
        raise ConfigError(f"warm_start: no scripted teacher for {missing}; teachers exist for {list(SCRIPTED_TASKS)}")


def _check_groups(config: TrainConfig) -> None:
    g = num_generations(config)
    if g < 2:
        raise ConfigError(f"num_generations must be >= 2 (GRPO normalises rewards within a group), got {g}")
    c = config.cluster
    if c.learner_num_ranks > 1 and c.groups_per_step % c.learner_num_ranks:
        raise ConfigError(
            f"cluster.groups_per_step ({c.groups_per_step}) must be divisible by "
            f"cluster.learner_num_ranks ({c.learner_num_ranks}) so every rank gets whole groups"
        )


def _check_weight_sync(config: TrainConfig) -> None:
    c = config.cluster
    if c.weight_sync != "nccl":
        return
    # NCCL needs a CUDA device at both ends and vLLM's worker extension on the receiving end.
    if config.engine.backend != "vllm":
        raise ConfigError(f"cluster.weight_sync nccl needs engine.backend vllm, got {config.engine.backend!r}")
    if c.rollout_num_gpus < 1 or c.learner_num_gpus < 1:
        raise ConfigError(
            "cluster.weight_sync nccl needs whole GPUs for the learner and each rollout worker "
            f"(learner_num_gpus={c.learner_num_gpus}, rollout_num_gpus={c.rollout_num_gpus}); "
            "use object_store on CPU"
        )


def _check_weight_update(config: TrainConfig) -> None:
    """In-flight updates only make sense where weights arrive during collection (async) and only
    the vLLM engine can take them between steps (actors/engines/update_gate.py)."""
    if config.engine.weight_update != "in_flight":
        return
    if config.cluster.mode != "async":
        raise ConfigError("engine.weight_update in_flight needs cluster.mode async (in sync mode no update "
                          f"arrives while the engines generate); got cluster.mode {config.cluster.mode}")
    if config.engine.backend != "vllm":
        raise ConfigError(f"engine.weight_update in_flight needs engine.backend vllm, got {config.engine.backend!r}")


def _check_colocation(config: TrainConfig) -> None:
    c, engine = config.cluster, config.engine
    vllm = engine.backend == "vllm"
    if engine.enable_sleep_mode and vllm and c.rollout_num_gpus <= 0:
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
    if c.rollout_num_gpus > 0 and vllm and engine.gpu_memory_utilization > c.rollout_num_gpus:
        raise ConfigError(f"cluster.colocate: engine.gpu_memory_utilization ({engine.gpu_memory_utilization:g}) "
                          "is vLLM's share of the whole GPU and must fit the engine's fraction rollout_num_gpus "
                          f"({c.rollout_num_gpus:g})")
    if engine.enable_sleep_mode and c.mode != "sync":
        raise ConfigError("engine.enable_sleep_mode with cluster.colocate needs cluster.mode sync: engines can "
                          "only sleep while no episode runs")


def _check_env_servers(config: TrainConfig) -> None:
    c = config.cluster
    if c.env_placement == "ray_actors" and config.eval.num_sessions > config.env.max_sessions:
        # The evaluation's own env-server host runs one server (driver `_eval_env_urls`).
        raise ConfigError(f"eval.num_sessions ({config.eval.num_sessions}) > env.max_sessions "
                          f"({config.env.max_sessions}): the evaluation's env server would refuse sessions")
    if c.env_placement != "remote" or not c.env_server_tasks:
        return
    # Every sampled task needs a server that serves it (an unlisted URL serves every task).
    if set(c.env_server_urls) - set(c.env_server_tasks):
        return
    served = {normalize_task(t) for ts in c.env_server_tasks.values() for t in ts}
    missing = [t for t in map(normalize_task, config.sampler.tasks) if t not in served]
    if missing:
        raise ConfigError(f"sampler.tasks {missing} are served by no URL in cluster.env_server_tasks; "
                          "start a server for each (README: remote env servers) and list it")


def _check_eval(config: TrainConfig) -> None:
    if not (config.eval.every_steps or config.eval.at_end):
        return
    start, stop = config.sampler.eval_seeds
    if stop - start < config.eval.episodes_per_task:
        raise ConfigError(
            f"sampler.eval_seeds has {stop - start} seeds, fewer than eval.episodes_per_task "
            f"({config.eval.episodes_per_task})"
        )
