"""The object-store path's staging file (actors/engines/shm_staging.py): the engine writes an update
into a file mapped once, the vLLM worker maps the same file and reads exactly those tensors."""

from __future__ import annotations

import os

import torch

from actors.engines.shm_staging import ALIGN, StagingFile, StagingReader


def _update(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(33, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(5, 8, generator=g),
        "model.norm.weight": torch.randn(7, generator=g),  # 14 bytes in bf16: the next slot realigns
    }


def test_round_trip_converts_to_the_engine_dtype_and_reuses_the_file():
    first = _update(0)
    staging = StagingFile(first, torch.bfloat16)
    path = staging.path
    try:
        assert all(s.offset % ALIGN == 0 for s in staging.slots)
        staging.write(first)
        reader = StagingReader(path, staging.layout_message(), torch.device("cpu"))
        got = dict(reader.tensors())
        assert list(got) == list(first)
        for name, t in first.items():
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(got[name], t.to(torch.bfloat16)), name
        # the next version goes into the same file, and the worker's mapping sees it
        second = _update(1)
        assert staging.fits(second)
        staging.write(second)
        for name, t in reader.tensors():
            assert torch.equal(t, second[name].to(torch.bfloat16)), name
        reader.close()
        # another layout (a different shape) does not fit: the engine makes a new file
        assert not staging.fits({**second, "model.norm.weight": torch.zeros(8)})
    finally:
        staging.close()
    assert not os.path.exists(path)
