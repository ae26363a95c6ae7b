"""The seed gist's environment variables: each one honoured as an override of one field
(`ENV_OVERRIDES`, `ENV_REMOTE_SERVERS`) or refused with what to use instead (`ENV_REFUSED`)."""

from __future__ import annotations

from typing import Any, Mapping

from cluster.config.schema import ConfigError
from cluster.config.tree import field_type_at, parse_value, set_dotted

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
ENV_OFF_VALUES = {"DEBUG": {"0", "false", "no"}}



def apply_env_overrides(tree: dict, env: Mapping[str, str]) -> None:
    """The seed gist's environment variables into the preset tree: each one honoured (ENV_OVERRIDES,
    ENV_REMOTE_SERVERS) or refused with the alternative (ENV_REFUSED); two names of one field must agree."""
    for var, why in ENV_REFUSED.items():
        value = env.get(var, "").strip()
        if value and value.lower() not in ENV_OFF_VALUES.get(var, set()):
            raise ConfigError(f"environment variable {var}={value!r} is not supported: {why}")
    set_by: dict[str, tuple[str, Any]] = {}
    for var, dotted in ENV_OVERRIDES.items():
        if var in env and env[var] != "":
            try:
                tp = field_type_at(dotted)
            except ConfigError as e:
                raise ConfigError(f"environment variable {var} maps to {dotted!r}, which does not exist: {e}") from e
            value = parse_value(env[var], tp)
            if dotted in set_by and set_by[dotted][1] != value:
                other, seen = set_by[dotted]
                raise ConfigError(f"environment variables {var}={value!r} and {other}={seen!r} both set {dotted}; "
                                  "set one of them")
            set_by[dotted] = (var, value)
            set_dotted(tree, dotted, value)
    urls = [u.strip() for u in env.get(ENV_REMOTE_SERVERS, "").split(",") if u.strip()]
    if urls:
        set_dotted(tree, "cluster.env_server_urls", urls)
        set_dotted(tree, "cluster.env_placement", "remote")
