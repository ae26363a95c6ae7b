"""Training settings mean what they say: one source of truth for the sampling settings and the
generation limit, `--dry-run` shows the resolved config, and combinations that would train on
wrong numbers are refused with the fields named."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cluster import config as C


def build(overrides=None, env=None, preset="local"):
    cfg = C.build_config(preset, overrides or {}, env or {})
    C.validate_config(cfg)
    return cfg


@pytest.mark.parametrize("preset", C.preset_names())
def test_every_preset_scores_with_its_sampling_settings(preset):
    cfg = build(preset=preset)
    s = cfg.rollout.sampling
    for grpo in (cfg.grpo, cfg.learner.grpo):
        assert (grpo.temperature, grpo.top_k, grpo.top_p) == (s.temperature, s.top_k, s.top_p)
        assert grpo.max_completion_length == s.max_new_tokens


def test_the_seed_presets_settings_reach_the_learner():
    # The seed's preset samples at 0.5 / top-k 10: the learner must score at the same.
    g = build(preset="qwen3-vl-2b-miniwob").learner.grpo
    assert (g.temperature, g.top_k, g.max_completion_length) == (0.5, 10, 16)


def test_seed_env_vars_reach_both_sides():
    cfg = build(env={"TEMPERATURE": "0.7", "TOP_K": "20", "TOP_P": "0.9", "MAX_NEW_TOKENS": "24"})
    assert (cfg.learner.grpo.temperature, cfg.learner.grpo.top_k, cfg.learner.grpo.top_p) == (0.7, 20, 0.9)
    assert cfg.learner.grpo.max_completion_length == 24


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grpo.temperature": "0.7"}, r"grpo.temperature is derived from rollout.sampling.temperature"),
        ({"grpo.top_k": "5"}, r"grpo.top_k is derived from rollout.sampling.top_k"),
        ({"grpo.top_p": "0.9"}, r"grpo.top_p is derived from rollout.sampling.top_p"),
        ({"grpo.max_completion_length": "64"},
         r"grpo.max_completion_length is derived from rollout.sampling.max_new_tokens"),
    ],
)
def test_derived_sampling_fields_cannot_be_set_apart(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        build(overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"engine.weight_update": "in_flight", "engine.backend": "vllm"},
         r"engine.weight_update in_flight needs cluster.mode async"),
        ({"engine.weight_update": "in_flight", "cluster.mode": "async", "engine.backend": "transformers"},
         r"engine.weight_update in_flight needs engine.backend vllm"),
        ({"engine.weight_update": "halfway"}, r"engine.weight_update must be drained or in_flight"),
    ],
)
def test_in_flight_weight_updates_need_async_and_vllm(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        build(overrides)
    ok = build({"engine.weight_update": "in_flight", "cluster.mode": "async", "engine.backend": "vllm"})
    assert ok.engine.weight_update == "in_flight"


def test_a_resolved_config_takes_new_source_values(tmp_path):
    # A run folder's config.yaml holds the derived copies; overriding their source (e.g. on
    # --resume) moves them along, and the learner's GRPO settings are the `grpo` section itself.
    path = C.save_config(build(), tmp_path / "config.yaml")
    cfg = build({"rollout.sampling.temperature": "0.9", "checkpoint.keep_last": "0"}, preset=str(path))
    assert cfg.learner.grpo is cfg.grpo and cfg.grpo.temperature == 0.9
    assert cfg.learner.keep_checkpoints == C.loader.KEEP_ALL
    with pytest.raises(C.ConfigError, match="grpo.temperature is derived from rollout.sampling.temperature"):
        build({"grpo.temperature": "0.9"}, preset=str(path))


def test_a_preset_cannot_set_the_completion_limit_apart(tmp_path):
    p = tmp_path / "apart.yaml"
    p.write_text("rollout:\n  sampling:\n    max_new_tokens: 16\ngrpo:\n  max_completion_length: 512\n")
    with pytest.raises(C.ConfigError, match="max_completion_length is derived from rollout.sampling.max_new_tokens"):
        build(preset=str(p))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rollout.sampling.temperature": "0"}, r"rollout.sampling.temperature is 0.*greedy"),
        ({"rollout.sampling.seed": "3"}, r"rollout.sampling.seed is 3.*same completions"),
        ({"rollout.sampling.max_new_tokens": "4096"},
         r"rollout.sampling.max_new_tokens \(4096\) must be below engine.max_model_len \(2048\)"),
        ({"learner.dtype": "float16", "cluster.learner_num_gpus": "1"}, r"learner.dtype float16"),
        ({"cluster.mode": "async", "grpo.vllm_importance_sampling_correction": "false"},
         r"cluster.mode async with grpo.vllm_importance_sampling_correction false"),
        ({"grpo.num_iterations": "0"}, r"grpo.num_iterations must be >= 1"),
        ({"rollout.sampling.top_p": "0"}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_silently_wrong_combinations_are_refused(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        build(overrides)


def test_dry_run_prints_the_resolved_config_without_starting_ray(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "--config", "qwen3-vl-2b-miniwob", "--dry-run",
         "--cluster.run_dir", str(run_dir), "--rollout.sampling.top_p", "0.95"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    # Derived fields are there with their resolved values, and the printout is a loadable config.
    assert printed["learner"]["grpo"]["temperature"] == 0.5
    assert printed["learner"]["grpo"]["top_p"] == 0.95
    assert printed["learner"]["model_path"] == "Qwen/Qwen3-VL-2B-Instruct"
    assert printed["learner"]["device"] == "cuda"
    path = tmp_path / "printed.yaml"
    path.write_text(out.stdout)
    assert C.to_dict(C.load_config(path)) == printed
    # Nothing ran: no run folder, no Ray log line.
    assert not run_dir.exists()
    assert "ray" not in out.stderr.lower()


def test_dry_run_refuses_a_bad_config():
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "--dry-run", "--grpo.temperature", "0.3"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert "grpo.temperature is derived from rollout.sampling.temperature" in out.stderr
