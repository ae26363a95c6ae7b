"""`bgrpo demos` and `bgrpo eval` end to end with a real browser and the tiny VLM."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.browser


def test_demonstrations_are_training_samples(tmp_path):
    from actors.demos import DEMO_POLICY_VERSION, DemoRenderer
    from cluster.demos_cli import main  # `bgrpo demos` (the CLI reads cluster/config.py)
    from actors.tiny_models import build_tiny_vl_model
    from core.trajectory import read_trajectories

    import yaml

    from cluster.config import PRESETS_DIR

    # The VLM path (screenshots in the prompt); the local preset itself is text-only.
    preset = yaml.safe_load((PRESETS_DIR / "local.yaml").read_text())
    preset["model"] = "tiny-vlm"
    preset["rollout"]["prompt"] = {"include_screenshot": True, "include_axtree": False}
    (tmp_path / "vlm.yaml").write_text(yaml.safe_dump(preset))
    out = tmp_path / "demos"
    assert main(["--config", str(tmp_path / "vlm.yaml"), "--tasks", "click-test-2,focus-text-2", "--episodes", "1",
                 "--sessions", "1", "--out", str(out)]) == 0
    groups = read_trajectories(out / "trajectories")
    assert sorted(g.task for g in groups) == ["miniwob.click-test-2", "miniwob.focus-text-2"]
    renderer = DemoRenderer(str(build_tiny_vl_model()))
    for g in groups:
        (t,) = g.trajectories
        assert t.success, (t.task, [s.action for s in t.steps], t.failure_reason)  # epsilon 0: a perfect teacher
        for s in t.steps:
            # the target is the action text the parser reads, then the end-of-turn token
            assert s.completion_ids == renderer.target_ids(s.action) and s.completion_text == s.action
            assert s.policy_version == DEMO_POLICY_VERSION and not s.parse_fallback
            assert len(s.images) == 1 and s.prompt_ids  # the screenshot, rendered into the prompt ids
            image_tokens = s.prompt_ids.count(renderer.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
            assert image_tokens > 0
    assert len(list((out / "viewer").glob("*.html"))) == 2


def test_bgrpo_eval_reports_intervals_on_held_out_seeds(tmp_path):
    from cluster.eval import main

    out = tmp_path / "eval"
    assert main(["--config", "local", "--model", "tiny-vlm", "--out", str(out), "--warm_start.enabled", "false",
                 "--eval.episodes_per_task", "2", "--eval.num_sessions", "1", "--eval.greedy", "true"]) == 0
    result = json.loads((out / "eval.json").read_text())
    row = result["tasks"]["miniwob.click-test-2"]
    assert row["episodes"] + row["failures"] == 2
    assert [s for _, s in result["seeds"]] == [1_000_000, 1_000_001]  # the first held-out seeds
    lo, hi = row["ci95"]
    assert 0.0 <= lo <= row["success_rate"] <= hi <= 1.0
    assert result["sampling"]["temperature"] == 0.0
    assert list((out / "viewer").glob("*.html"))
