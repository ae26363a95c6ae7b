import pytest

from core.trajectory import (
    FAILED,
    Step,
    Trajectory,
    TrajectoryGroup,
    TrajectoryWriter,
    read_trajectories,
)


def _group(n=3):
    trajs = []
    for i in range(n):
        steps = [
            Step(index=j, prompt_ids=[1, 2, 3 + j], completion_ids=[4, 5], logprobs=[-0.5, -0.25],
                 policy_version=j, images=[b"\x89PNG fake"], completion_text="click('1')",
                 action="click('1')", reward=float(j == 1), done=j == 1)
            for j in range(2)
        ]
        trajs.append(Trajectory(episode_id=f"e{i}", group_id="g1", task="miniwob.click-test",
                                seed=7, steps=steps, episode_return=1.0 if i else 0.0,
                                status=FAILED if i == 2 else "finished", failure_reason="x" * (i == 2)))
    return TrajectoryGroup("g1", "miniwob.click-test", 7, trajs)


def test_parquet_round_trip(tmp_path):
    g = _group()
    TrajectoryWriter(tmp_path).write(g)
    (back,) = read_trajectories(tmp_path)
    assert back == g
    assert back.min_policy_version == 0
    assert [t.trainable for t in back.trajectories] == [True, True, False]


def test_token_versions_round_trip_and_checks(tmp_path):
    # A step whose tokens came from two versions (an in-flight weight update) keeps them through
    # Parquet; policy_version must be the oldest; a step built without them gets its version's.
    mixed = Step(index=0, prompt_ids=[1], completion_ids=[4, 5, 6], logprobs=[-0.1, -0.2, -0.3],
                 policy_version=3, token_versions=[3, 4, 4])
    g = TrajectoryGroup("g2", "t", 1, [Trajectory("e", "g2", "t", 1, steps=[mixed])])
    TrajectoryWriter(tmp_path).write(g)
    (back,) = read_trajectories(tmp_path)
    assert back.trajectories[0].steps[0].token_versions == [3, 4, 4]
    assert Step(index=0, prompt_ids=[1], completion_ids=[4, 5], logprobs=[0.0, 0.0],
                policy_version=2).token_versions == [2, 2]
    with pytest.raises(ValueError, match="oldest"):
        Step(index=0, prompt_ids=[1], completion_ids=[4, 5], logprobs=[0.0, 0.0], policy_version=4,
             token_versions=[3, 4])
    with pytest.raises(ValueError, match="token versions"):
        Step(index=0, prompt_ids=[1], completion_ids=[4, 5], logprobs=[0.0, 0.0], policy_version=3,
             token_versions=[3])


def test_group_rejects_foreign_episode():
    g = _group()
    g.trajectories[0].seed = 8
    with pytest.raises(ValueError, match="does not belong"):
        TrajectoryGroup(g.group_id, g.task, g.seed, g.trajectories)


def test_step_rejects_mismatched_logprobs():
    with pytest.raises(ValueError, match="logprobs"):
        Step(index=0, prompt_ids=[1], completion_ids=[1, 2], logprobs=[0.0], policy_version=0)


def test_failed_episode_without_return_reads_back_and_renders(tmp_path):
    """A failed episode stores no return (None, null in Parquet): the metadata the driver schedules
    on, the viewer page and the run index must take it as "none", never as a reward of 0."""
    from actors.viewer import render_group_html
    from cluster.run_index import group_row
    from core.group_meta import GroupMeta

    g = _group()
    g.trajectories[2].episode_return = None
    TrajectoryWriter(tmp_path).write(g)
    (back,) = read_trajectories(tmp_path)
    assert [t.episode_return for t in back.trajectories] == [0.0, 1.0, None]
    meta = GroupMeta.of(back)
    assert [e.episode_return for e in meta.episodes] == [0.0, 1.0, None]
    assert not back.trajectories[2].success
    assert "returns: 0, 1, none" in render_group_html(back)
    assert group_row(back, "train", "viewer/x.html")["returns"] == [0.0, 1.0, None]
