"""Two learner ranks (Ray actors, torch.distributed over gloo) == one rank on the combined batch."""

from __future__ import annotations

import pytest
import torch

from learner.config import GRPOConfig, LearnerConfig
from tests.fixtures.learner import synthetic_groups

STEPS = 3


def _config(model_path, micro_batch_size: int, num_ranks: int, loss_type: str) -> LearnerConfig:
    return LearnerConfig(
        model_path=str(model_path),
        lr=5e-3,
        weight_decay=0.01,
        micro_batch_size=micro_batch_size,
        num_ranks=num_ranks,
        seed=3,
        grpo=GRPOConfig(loss_type=loss_type, beta=0.0, vllm_importance_sampling_mode="token_truncate"),
    )


# dapo (token-level whole-batch normaliser). The other loss types differ only in the denominator,
# which test_grpo_loss.py checks for every type under any cut of the batch; the rank machinery
# (sharding, SUM all-reduce) is the same for all of them, so one pair of actors suffices.
@pytest.mark.parametrize("loss_type", ["dapo"])
def test_two_gloo_ranks_equal_one_rank(tiny_text_model, ray_cluster, loss_type):
    import ray

    from learner.learner import Learner, LearnerActor

    batches = [synthetic_groups(seed=10 + s, n_groups=3, group_size=4, max_steps=3) for s in range(STEPS)]

    # One rank, the whole batch in big micro-batches.
    single = Learner(_config(tiny_text_model, 16, 1, loss_type))
    single_metrics = [single.train_step(b) for b in batches]
    expected = single.get_weights()

    # Two ranks, small micro-batches (each rank also accumulates, unevenly).
    ranks = [
        LearnerActor.options(num_cpus=1).remote(_config(tiny_text_model, 3, 2, loss_type), rank=r, world_size=2)
        for r in range(2)
    ]
    try:
        host, port = ray.get(ranks[0].rendezvous_address.remote(), timeout=120)
        ray.get([a.connect.remote(host, port) for a in ranks], timeout=120)
        for b, m1 in zip(batches, single_metrics):
            ref = ray.put(b)  # one copy of the batch for both ranks
            m_r0, m_r1 = ray.get([a.train_step.remote(ref) for a in ranks], timeout=300)
            assert m_r0["samples"] == m1["samples"] and m_r0["tokens"] == m1["tokens"]
            assert m_r0["loss"] == pytest.approx(m1["loss"], rel=1e-4, abs=1e-6)
            assert m_r0["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
            assert m_r0["loss"] == m_r1["loss"]  # metrics are of the whole batch on every rank
        w0, w1 = ray.get([a.get_weights.remote() for a in ranks], timeout=120)

        _bad_shard_fails_on_both_ranks(ranks)
        versions = ray.get([a.get_policy_version.remote() for a in ranks], timeout=60)
        assert versions == [STEPS, STEPS]
        handle = ray.get(ranks[0].send_weights.remote("object_store"), timeout=120)
        assert ray.get(ranks[1].send_weights.remote("object_store"), timeout=120) is None  # rank 0 sends
        assert handle.version == STEPS
    finally:
        for a in ranks:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(a)

    initial = Learner(_config(tiny_text_model, 16, 1, loss_type)).get_weights()
    _assert_same_update(initial, expected, w0, w1)


def _bad_shard_fails_on_both_ranks(ranks) -> None:
    """A bad sample on rank 1's shard only (images for a text model): both ranks fail fast (no
    rank waits in the gradient all-reduce), each with its own reason, and neither updates (the
    caller checks the versions)."""
    import ray

    bad = synthetic_groups(seed=99, n_groups=1, group_size=2, max_steps=1)
    bad[0].trajectories[1].steps[0].images = [b"not even a png"]  # sample 1 -> rank 1
    futures = [a.train_step.remote(bad) for a in ranks]
    for f, expected_error in zip(futures, ("another learner rank", "carry images")):
        with pytest.raises(ray.exceptions.RayTaskError, match=expected_error):
            ray.get(f, timeout=120)


def _assert_same_update(initial: dict, expected: dict, w0: dict, w1: dict) -> None:
    """Both ranks' weights equal each other exactly and the one-rank weights `expected` up to
    summation order. Adam divides by sqrt(v): for elements whose gradient is ~0, float32
    summation-order noise (two ranks sum in a different order) changes the update's sign. So:
    every element within 2% of the largest update of its tensor, and nearly all elements within
    1e-5."""
    for k in expected:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)  # ranks stay identical
        update = (expected[k] - initial[k]).abs().max()
        diff = (w0[k] - expected[k]).abs()
        assert diff.max() <= 0.02 * update + 1e-7, (k, float(diff.max()), float(update))
        assert (diff > 1e-5).float().mean() < 1e-3, k
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected)  # a real update
