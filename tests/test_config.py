"""Configuration: presets, overrides, env vars, validation before anything starts, round trip."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cluster
from cluster import config as C


def build(overrides=None, env=None, preset="local"):
    cfg = C.build_config(preset, overrides or {}, env or {})
    C.validate_config(cfg)
    return cfg


def test_presets_load_and_validate():
    for name in ("local", "qwen3-vl-2b-miniwob"):
        assert name in C.preset_names()
        build(preset=name)
    qwen = build(preset="qwen3-vl-2b-miniwob")
    assert qwen.model == "Qwen/Qwen3-VL-2B-Instruct"
    assert qwen.grpo.num_generations == 8
    assert qwen.rollout.max_steps == 8
    s = qwen.rollout.sampling
    assert (s.max_new_tokens, s.temperature, s.top_k) == (16, 0.5, 10)
    assert (qwen.learner.lr, qwen.learner.weight_decay, qwen.learner.warmup_steps) == (1e-6, 0.0, 20)
    assert qwen.cluster.groups_per_step == 8  # the gist's gradient accumulation 8
    assert qwen.engine.backend == "vllm" and qwen.cluster.rollout_num_gpus >= 1
    assert len(qwen.sampler.tasks) > 5


def test_presets_ship_as_package_data():
    # An installed package (no checkout around it) finds the presets by name: they live inside the
    # `cluster` package and pyproject's package-data lists them.
    root = Path(cluster.__file__).resolve().parent
    assert C.PRESETS_DIR.resolve().parent == root
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["cluster"]
    presets = sorted(C.PRESETS_DIR.glob("*.yaml"))
    assert {p.stem for p in presets} >= {"local", "gpu-smoke", "qwen3-vl-2b-miniwob"}
    for path in presets:
        assert any(fnmatch.fnmatch(str(path.relative_to(root)), pat) for pat in patterns), path


def test_preset_by_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("cluster:\n  total_steps: 11\n")
    assert build(preset=str(p)).cluster.total_steps == 11


def test_unknown_preset_lists_presets():
    with pytest.raises(C.ConfigError, match="unknown preset 'nope'.*local"):
        C.build_config("nope", {}, {})


def test_dotted_overrides_are_typed():
    cfg = build({"learner.lr": "1e-6", "cluster.mode": "async", "cluster.total_steps": "7",
                 "sampler.tasks": "[click-test, click-button]", "rollout.sampling.top_k": "5"})
    assert cfg.learner.lr == 1e-6 and isinstance(cfg.learner.lr, float)
    assert cfg.cluster.mode == "async"
    assert cfg.cluster.total_steps == 7
    assert cfg.sampler.tasks == ["click-test", "click-button"]
    # A partial nested section keeps the parent's defaults for the other fields.
    assert cfg.rollout.sampling.top_k == 5 and cfg.rollout.sampling.max_new_tokens == 16


def test_env_captures_screenshots_only_when_the_prompt_shows_them():
    # The env server's capture follows the prompt: a text-only model's env skips it (~70 ms a step).
    assert build({"rollout.prompt.include_screenshot": "true"}).env.include_screenshot is True
    assert build({"rollout.prompt.include_screenshot": "false"}).env.include_screenshot is False
    with pytest.raises(C.ConfigError, match="env.include_screenshot is derived from rollout.prompt.include_screenshot"):
        build({"rollout.prompt.include_screenshot": "false", "env.include_screenshot": "true"})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learner.lrr": "1"}, r"unknown config key 'learner.lrr' \(did you mean learner.lr\?\)"),
        ({"cluster.total_steps": "three"}, r"cluster.total_steps: expected an integer, got 'three'"),
        ({"cluster.total_steps": "2.5"}, r"cluster.total_steps: expected an integer"),
        ({"cluster.mode": "fast"}, r"cluster.mode: 'fast' is not one of \['sync', 'async'\]"),
        ({"cluster.max_staleness": "-1"}, r"max_staleness must be >= 0"),
        ({"cluster.num_rollout_workers": "0"}, r"num_rollout_workers must be >= 1"),
        ({"sampler.tasks": "[click-tset]"}, r"unknown MiniWoB task 'click-tset' \(did you mean miniwob.click-test\?\)"),
        ({"env.task": "miniwob.no-such-task"}, r"env.task: unknown MiniWoB task 'miniwob.no-such-task'"),
        ({"sampler.eval_seeds": "[10, 20]"}, r"overlap"),
        ({"grpo.num_generations": "1"}, r"num_generations must be >= 2"),
        ({"learner.lr": "-1"}, r"learner.lr must be >= 0"),
        ({"learner.total_steps": "9"}, r"learner.total_steps is derived from cluster.total_steps"),
        ({"cluster.learner_num_ranks": "2", "cluster.groups_per_step": "3"}, r"divisible by cluster.learner_num_ranks"),
        ({"logging.trackers": "[wandb]"}, r"not installed|unknown"),
        ({"logging.trackers": "[mlflow]"}, r"unknown \['mlflow'\]"),
        ({"cluster": "1"}, r"is a section"),
        ({"cluster.env_placement": "remote"}, r"env_server_urls is empty"),
        ({"engine.backend": "tgi"}, r"engine.backend must be"),
        ({"cluster.weight_sync": "nccl"}, r"weight_sync nccl needs engine.backend vllm"),
        ({"cluster.weight_sync": "nccl", "engine.backend": "vllm"}, r"weight_sync nccl needs whole GPUs"),
        ({"cluster.weight_sync": "gloo"}, r"'gloo' is not one of \['object_store', 'nccl'\]"),
        ({"engine.max_model_len": "abc"}, r"engine.max_model_len: expected an integer, got 'abc'"),
        ({"cluster.env_server_tasks": "{http://a:1: 3}"}, r"cluster.env_server_tasks.http://a:1: expected a list"),
        ({"rollout.sampling.seeed": "1"}, r"unknown config key 'rollout.sampling.seeed' \(did you mean rollout.sampling.seed\?\)"),
        ({"learner.device": "cuda"}, r"learner.device is derived from cluster.learner_num_gpus"),
        ({"cluster.colocate": "true"}, r"learner_num_ranks \(1\) must equal num_rollout_workers \(2\)"),
        ({"cluster.colocate": "true", "cluster.num_rollout_workers": "1", "cluster.learner_num_gpus": "0.6",
          "cluster.rollout_num_gpus": "0.6"}, r"must be <= 1, got 0.6 \+ 0.6"),
        ({"cluster.colocate": "true", "cluster.num_rollout_workers": "1", "cluster.learner_num_gpus": "0.5",
          "cluster.rollout_num_gpus": "0.5", "engine.backend": "vllm", "engine.gpu_memory_utilization": "0.8"},
         r"gpu_memory_utilization \(0.8\) is vLLM's share"),
        ({"cluster.colocate": "true", "cluster.num_rollout_workers": "1", "cluster.learner_num_gpus": "1",
          "cluster.rollout_num_gpus": "1", "cluster.weight_sync": "nccl", "engine.backend": "vllm"},
         r"colocate needs weight_sync object_store|must be <= 1"),
        ({"engine.enable_sleep_mode": "true", "engine.backend": "vllm"}, r"enable_sleep_mode needs vLLM on a GPU"),
        ({"cluster.colocate": "true", "cluster.num_rollout_workers": "1", "cluster.learner_num_gpus": "0.5",
          "cluster.rollout_num_gpus": "0.5", "engine.backend": "vllm", "engine.enable_sleep_mode": "true",
          "cluster.mode": "async"}, r"enable_sleep_mode with cluster.colocate needs cluster.mode sync"),
    ],
)
def test_bad_configs_are_rejected_with_clear_messages(overrides, message):
    if overrides == {"logging.trackers": "[wandb]"}:
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:  # installed here: then it is accepted
            build(overrides)
            return
    with pytest.raises(C.ConfigError, match=message):
        build(overrides)


def test_env_vars_of_the_seed_gist():
    env = {"MODEL_ID": "/models/x", "NUM_GENERATIONS": "6", "MAX_STEPS": "5", "MAX_NEW_TOKENS": "32",
           "TEMPERATURE": "0.7", "TOP_K": "20", "LEARNING_RATE": "3e-6", "TASKS": "click-test,click-button"}
    cfg = build(env=env)
    assert cfg.model == "/models/x" and cfg.learner.model_path == "/models/x" and cfg.engine.model == "/models/x"
    assert cfg.grpo.num_generations == 6 and cfg.learner.grpo.num_generations == 6
    assert cfg.rollout.max_steps == 5 and cfg.env.max_steps == 5
    assert cfg.rollout.sampling.max_new_tokens == 32
    assert cfg.rollout.sampling.temperature == 0.7 and cfg.rollout.sampling.top_k == 20
    assert cfg.learner.lr == 3e-6
    assert cfg.sampler.tasks == ["click-test", "click-button"]
    # command-line flags beat env vars
    assert build({"learner.lr": "1e-5"}, env).learner.lr == 1e-5
    with pytest.raises(C.ConfigError, match="TEMPERATURE|rollout.sampling.temperature"):
        build(env={"TEMPERATURE": "hot"})


def test_every_env_var_maps_to_an_existing_field():
    for var, dotted in C.ENV_OVERRIDES.items():
        C.field_type_at(dotted)  # raises ConfigError if a layer renamed the field


def test_resolved_config_round_trips(tmp_path):
    cfg = build({"cluster.mode": "async", "learner.lr": "2e-5", "sampler.tasks": "[click-button]"})
    path = C.save_config(cfg, tmp_path / "run" / "config.yaml")
    again = C.load_config(path)
    assert again == cfg
    assert C.to_dict(again) == yaml.safe_load(path.read_text())


def test_every_field_has_a_docstring_and_help_lists_it():
    text = C.help_text()
    missing = []
    for name, _, _, doc in C.iter_fields():
        assert f"--{name} " in text
        # SamplingSettings (actors/engine.py) documents its fields in its class docstring.
        if not doc and not name.startswith("rollout.sampling."):
            missing.append(name)
    assert not missing, f"fields without a docstring: {missing}"
    assert "MODEL_ID" in text
    # Derived fields are listed with their source, not a default one could set.
    assert "--learner.total_steps (int, derived from cluster.total_steps, not set directly)" in text
    assert "--grpo.temperature (float, derived from rollout.sampling.temperature, not set directly)" in text


def test_parse_cli_and_resume(tmp_path):
    cl = C.parse_cli(["--config", "local", "--learner.lr=1e-6", "--cluster.total_steps", "4"], environ={})
    assert cl.config.learner.lr == 1e-6 and cl.config.cluster.total_steps == 4 and cl.resume is None
    with pytest.raises(C.ConfigError, match="needs a value"):
        C.parse_cli(["--learner.lr"], environ={})
    with pytest.raises(C.ConfigError, match="unexpected argument"):
        C.parse_cli(["local"], environ={})
    assert C.parse_cli(["--help"], environ={}).help
    # --resume takes the run folder's resolved config as the base
    run = tmp_path / "run"
    C.save_config(cl.config, run / "config.yaml")
    resumed = C.parse_cli(["--resume", str(run), "--cluster.total_steps", "6"], environ={})
    assert resumed.config.learner.lr == 1e-6 and resumed.config.cluster.total_steps == 6
    assert resumed.config.cluster.run_dir == str(run) and resumed.resume == str(run)
    with pytest.raises(C.ConfigError, match="no config.yaml"):
        C.parse_cli(["--resume", str(tmp_path / "nothing")], environ={})


def test_field_docs_reads_docstrings_under_fields():
    @dataclasses.dataclass
    class Demo:
        a: int = 1
        """the a."""
        b: str = "x"

    assert C.field_docs(Demo) == {"a": "the a."}


# Every environment variable the seed gist (TRL's OpenEnv BrowserGym GRPO script) reads, with a value
# and what it must become: a field of the resolved config (honoured) or an error naming the
# alternative (refused). Nothing the gist reads may be silently ignored.
SEED_GIST_ENV_VARS = {
    "MODEL_ID": ("/models/x", {"model": "/models/x"}),
    "MAX_STEPS": ("5", {"rollout.max_steps": 5}),
    "MAX_NEW_TOKENS": ("32", {"rollout.sampling.max_new_tokens": 32}),
    "TEMPERATURE": ("0.7", {"rollout.sampling.temperature": 0.7}),
    "TOP_K": ("20", {"rollout.sampling.top_k": 20}),
    "LEARNING_RATE": ("3e-6", {"learner.lr": 3e-6}),
    "WEIGHT_DECAY": ("0.1", {"learner.weight_decay": 0.1}),
    "GRAD_ACCUM_STEPS": ("6", {"cluster.groups_per_step": 6}),
    "WARMUP_STEPS": ("7", {"learner.warmup_steps": 7}),
    "PER_DEVICE_BATCH_SIZE": ("2", {"learner.micro_batch_size": 2}),
    "NUM_GENERATIONS": ("6", {"grpo.num_generations": 6}),
    "SAVE_INTERVAL": ("25", {"checkpoint.every_steps": 25}),
    "BROWSERGYM_BASE_URL": ("http://envs:8001", {"cluster.env_placement": "remote",
                                                 "cluster.env_server_urls": ["http://envs:8001"]}),
    "MAX_DOM_CHARS": ("3500", {"rollout.prompt.max_axtree_chars": 3500}),
    "FALLBACK_ACTION": ("noop()", {"rollout.fallback_action": "noop()"}),
    "NUM_EPOCHS": ("2", "cluster.total_steps"),
    "DATASET_SIZE": ("1000", "sampler.train_seeds"),
    "VLLM_ENDPOINT": ("http://localhost:8000/generate/", "engine.backend"),
    "DEBUG": ("1", "rollout.write_viewer"),
    "STEP_DENSE_WEIGHT": ("0.2", "rollout.invalid_action_penalty"),
    "SHAPING_NOOP_PENALTY": ("0.05", "rollout.invalid_action_penalty"),
    "SHAPING_ERROR_PENALTY": ("0.1", "rollout.invalid_action_penalty"),
    "SHAPING_REPEAT_ACTION_PENALTY": ("0.05", "rollout.invalid_action_penalty"),
    "SHAPING_NOVEL_CLICK_BONUS": ("0.05", "rollout.invalid_action_penalty"),
    "SHAPING_REPEAT_CLICK_PENALTY": ("0.02", "rollout.invalid_action_penalty"),
    "SHAPING_NOVEL_TEXT_BONUS": ("0.05", "rollout.invalid_action_penalty"),
    "SHAPING_REPEAT_TEXT_PENALTY": ("0.02", "rollout.invalid_action_penalty"),
}


@pytest.mark.parametrize("var", sorted(SEED_GIST_ENV_VARS))
def test_every_seed_gist_env_var_is_honoured_or_refused(var):
    value, expected = SEED_GIST_ENV_VARS[var]
    if isinstance(expected, dict):
        cfg = build(env={var: value})
        for dotted, want in expected.items():
            assert C.get_dotted(cfg, dotted) == want, (var, dotted)
        assert var in C.help_text()
    else:  # refused: the message names the variable and the field to use instead
        with pytest.raises(C.ConfigError, match=rf"{var}.*{re.escape(expected)}"):
            build(env={var: value})


def test_seed_gist_env_vars_edge_cases():
    # The gist's and the project's name for the same knob must agree when both are set.
    assert build(env={"GRAD_ACCUM_STEPS": "4", "GRADIENT_ACCUMULATION_STEPS": "4"}).cluster.groups_per_step == 4
    with pytest.raises(C.ConfigError, match="GRAD_ACCUM_STEPS.*GRADIENT_ACCUMULATION_STEPS"):
        build(env={"GRAD_ACCUM_STEPS": "4", "GRADIENT_ACCUMULATION_STEPS": "2"})
    # Several comma-separated env servers; DEBUG off (the gist's default) is no request at all.
    cfg = build(env={"BROWSERGYM_BASE_URL": "http://a:8001, http://b:8001", "DEBUG": "0"})
    assert cfg.cluster.env_server_urls == ["http://a:8001", "http://b:8001"]
    # A command-line flag still beats the variable.
    assert build({"checkpoint.every_steps": "3"}, {"SAVE_INTERVAL": "25"}).checkpoint.every_steps == 3


def test_configuration_reference_is_the_help_output():
    # docs/configuration.md is `bgrpo train --help` verbatim: a field added or documented differently
    # must be regenerated there too.
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    doc = (Path(cluster.__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    block = doc.split("```\n", 1)[1].rsplit("```", 1)[0]
    assert block == out, "regenerate docs/configuration.md from `python -m cluster.cli train --help`"
