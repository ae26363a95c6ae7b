"""The object-store wire format of weight updates (weightsync/object_store.py)."""

import torch

from weightsync.object_store import decode, encode


def test_round_trip_is_bit_exact_for_every_float_dtype(ray_cluster):
    import ray

    named = {
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "b.f32": torch.randn(7),
        "c.f16": torch.randn(2, 2).half(),
        "d.noncontig": torch.randn(4, 6).t(),
    }
    back = decode(ray.get(ray.put(encode(named))))
    assert list(back) == list(named)
    for name, t in named.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name


def test_plain_mappings_pass_through():
    named = {"w": torch.ones(2)}
    assert decode(named) == named
    assert decode(named) is not named  # a new dict: callers may not mutate the input
