"""The warm start and evaluation pieces without a browser: the noisy teacher, the intervals, the
evaluation summary's failure accounting, the held-out split, and SFT in the real learner on a
tiny model (completion-only loss that falls, prompt tokens never trained on)."""

from __future__ import annotations

import random

import pytest

from core.trajectory import FAILED, FINISHED, Step, Trajectory, TrajectoryGroup
from cluster.eval import compare, difference_interval, summarize, wilson_interval
from envs.browsergym.models import BrowserGymObservation
from envs.browsergym.scripted import NoScriptedAction, noisy_action, random_valid_action, scripted_action


def _obs(task: str, goal: str, elements: list[dict], axtree: str = "") -> BrowserGymObservation:
    return BrowserGymObservation(task_name=task, goal=goal, clickable_elements=elements, axtree_txt=axtree)


def test_teachers_read_the_goal():
    boxes = [{"bid": str(12 + i), "role": "textbox", "tag": "input", "text": ""} for i in range(3)]
    assert scripted_action(_obs("miniwob.focus-text-2", "Focus into the 3rd input textbox.", boxes)) == "click('14')"
    options = [{"bid": "18", "role": "checkbox", "text": "ab"}, {"bid": "21", "role": "checkbox", "text": "cd"},
               {"bid": "27", "role": "button", "text": "Submit"}]
    obs = _obs("miniwob.click-checkboxes", "Select cd, ab and click Submit.", options)
    assert [scripted_action(obs, h) for h in [(), ("x",), ("x", "y")]] == ["click('21')", "click('18')", "click('27')"]
    with pytest.raises(NoScriptedAction):
        scripted_action(_obs("miniwob.click-checkboxes", "Select zz and click Submit.", options))


def test_noisy_teacher_takes_random_valid_actions_at_rate_epsilon():
    buttons = [{"bid": "13", "role": "button", "text": "ONE"}, {"bid": "14", "role": "button", "text": "TWO"}]
    obs = _obs("miniwob.click-test-2", "Click button ONE.", buttons)
    rng = random.Random(0)
    assert {noisy_action(obs, (), 0.0, rng) for _ in range(50)} == {"click('13')"}
    actions = [noisy_action(obs, (), 0.8, rng) for _ in range(2000)]
    # correct = (1 - eps) + eps / 2 = 0.6 with two buttons
    assert 0.55 < actions.count("click('13')") / len(actions) < 0.65
    assert set(actions) == {"click('13')", "click('14')"}
    assert random_valid_action(_obs("x", "", []), rng) == "noop(0)"


def test_wilson_and_difference_intervals():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.29  # known value 0.2775
    lo, hi = wilson_interval(24, 40)
    assert lo < 0.6 < hi and 0.44 < lo < 0.46 and 0.73 < hi < 0.75
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = difference_interval(20, 40, 36, 40)
    assert 0 < lo < 0.4 < hi
    lo, hi = difference_interval(20, 40, 22, 40)
    assert lo < 0 < hi


def _traj(task: str, seed: int, status: str, reward: float) -> Trajectory:
    return Trajectory("e", "g", task, seed, status=status, episode_return=reward,
                      failure_reason="env_error: died" if status == FAILED else "")


def test_infrastructure_failures_are_reported_never_scored():
    instances = [("a", 1), ("a", 2), ("a", 3), ("b", 1)]
    outcomes = [
        TrajectoryGroup("g", "a", 1, [_traj("a", 1, FINISHED, 1.0)]),
        TrajectoryGroup("g", "a", 2, [_traj("a", 2, FAILED, 0.0)]),
        RuntimeError("actor died"),
        TrajectoryGroup("g", "b", 1, [_traj("b", 1, FINISHED, 0.0)]),
    ]
    result = summarize(instances, outcomes)
    a = result["tasks"]["a"]
    assert (a["episodes"], a["successes"], a["failures"]) == (1, 1, 2)
    assert a["success_rate"] == 1.0  # not 1/3: the failures say nothing about the policy
    assert len(a["failure_reasons"]) == 2
    assert result["overall"]["episodes"] == 2 and result["overall"]["success_rate"] == 0.5
    c = compare(result, result)
    assert c["difference"] == 0 and not c["significant"]


def _demo_groups(n: int, prompt_ids: list[int], target: list[int]) -> list[TrajectoryGroup]:
    groups = []
    for i in range(n):
        step = Step(index=0, prompt_ids=prompt_ids + [i % 7 + 10], completion_ids=target,
                    logprobs=[0.0] * len(target), policy_version=-1)
        groups.append(TrajectoryGroup(f"g{i}", "t", i, [Trajectory(f"e{i}", f"g{i}", "t", i, steps=[step],
                                                               episode_return=1.0)]))
    return groups


def test_sft_in_the_learner_fits_the_completion_only():
    from actors.tiny_models import build_tiny_text_model
    from learner.config import LearnerConfig
    from learner.learner import Learner
    from learner.sft import sft_samples, split_heldout

    cfg = LearnerConfig(model_path=str(build_tiny_text_model()), lr=1e-3, micro_batch_size=4)
    learner = Learner(cfg)
    target = [391, 281, 407, 280, 2]
    train, held = split_heldout(_demo_groups(12, [5, 6, 7, 8, 9] * 8, target), 0.25)
    assert len(held) == 3 and not {id(g) for g in held} & {id(g) for g in train}
    before = learner.sft_loss(held)
    assert before["sft_tokens"] == 3 * len(target)  # completion tokens only, no prompt token
    weights_before = [p.detach().clone() for p in learner.params]
    learner.sft_loss(held)
    assert all((a == b).all() for a, b in zip(weights_before, learner.params))  # no update from sft_loss
    for _ in range(15):
        learner.sft_step(train, lr=3e-3)
    after = learner.sft_loss(held)
    assert after["sft_loss"] < 0.5 * before["sft_loss"], (before, after)
    assert after["sft_token_accuracy"] == 1.0
    assert learner.policy_version == 0
    assert learner.finish_warm_start() == 1
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    # failed episodes are never demonstrations
    failed = TrajectoryGroup("f", "t", 0, [Trajectory("f", "f", "t", 0, status=FAILED, steps=[
        Step(index=0, prompt_ids=[1], completion_ids=[2], logprobs=[0.0], policy_version=-1)])])
    assert sft_samples([failed]) == []
