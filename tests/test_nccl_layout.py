"""The NCCL transport's bucket layout (pure CPU; the broadcast itself is a GPU test)."""

import pytest
import torch

from weightsync.nccl import BucketLayout, WeightSyncError, check_header


def _named():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(50, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
        "lm_head.weight": torch.randn(50, 8, generator=g),
    }


@pytest.mark.parametrize("bucket_bytes", [64, 1000, 1 << 20])
def test_pack_unpack_round_trip_is_exact(bucket_bytes):
    named = _named()
    layout = BucketLayout.build(((n, t.shape) for n, t in named.items()), torch.bfloat16, bucket_bytes)
    layout = BucketLayout.from_wire(layout.to_wire())  # what the engines receive
    buckets = layout.pack(named, torch.device("cpu"))
    assert sum(b.numel() for b in buckets) == sum(t.numel() for t in named.values())
    if bucket_bytes == 1 << 20:
        assert len(buckets) == 1
    else:
        assert len(buckets) > 1
    back = dict(layout.unpack(buckets))
    assert list(back) == list(named)
    for n, t in named.items():
        assert torch.equal(back[n], t.to(torch.bfloat16)), n


def test_pack_rejects_missing_and_misshaped():
    named = _named()
    layout = BucketLayout.build(((n, t.shape) for n, t in named.items()), torch.float32, 1 << 20)
    with pytest.raises(WeightSyncError, match="missing"):
        layout.pack({k: v for k, v in named.items() if k != "lm_head.weight"}, torch.device("cpu"))
    named["model.norm.weight"] = torch.zeros(9)
    with pytest.raises(WeightSyncError, match="shape"):
        layout.pack(named, torch.device("cpu"))


def test_the_header_carries_version_and_layout():
    """A receiver loads a broadcast only when its header is the announced version in its layout."""
    named = _named()
    layout = BucketLayout.build(((n, t.shape) for n, t in named.items()), torch.bfloat16, 1000)
    same = BucketLayout.from_wire(layout.to_wire())
    assert same.fingerprint == layout.fingerprint and 0 <= layout.fingerprint < 2**63  # an int64
    check_header([7, layout.fingerprint], 7, same)
    with pytest.raises(WeightSyncError, match="carries v6, the driver announced v7"):
        check_header([6, layout.fingerprint], 7, same)
    other = BucketLayout.build(((n, t.shape) for n, t in named.items()), torch.bfloat16, 64)
    assert other.fingerprint != layout.fingerprint  # another bucketing is another layout
    with pytest.raises(WeightSyncError, match="another bucket layout"):
        check_header([7, other.fingerprint], 7, same)
