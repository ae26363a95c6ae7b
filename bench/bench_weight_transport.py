"""Object-store weight transport: the project's numpy wire format vs plain torch tensors.

    python bench/bench_weight_transport.py [--mb 800] [--repeats 3]

Both variants move the same named bf16 CPU tensors through one local Ray object store: `ray.put`
by the publisher, `ray.get` + decode by a consumer (here the same process, as the learner and a
worker on one node share the store). Prints the medians and the ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=800, help="update size in MB (bf16)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import ray
    import torch

    from weightsync.object_store import decode, encode

    n = max(1, args.mb // 2)  # 1024x1024 bf16 = 2 MiB each
    named = {f"layers.{i}.weight": torch.randn(1024, 1024).to(torch.bfloat16) for i in range(n)}
    nbytes = sum(t.numel() * t.element_size() for t in named.values())
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=max(2 * nbytes + (256 << 20), 1 << 30))
    variants = {"torch (pickled)": (lambda d: d, dict), "numpy wire (ours)": (encode, decode)}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    try:
        for _ in range(args.repeats):  # interleaved, so machine load hits both alike
            for name, (enc, dec) in variants.items():
                t0 = time.perf_counter()
                ref = ray.put(enc(named))
                t1 = time.perf_counter()
                back = dec(ray.get(ref))
                t2 = time.perf_counter()
                assert torch.equal(back["layers.0.weight"], named["layers.0.weight"])
                results[name].append((t1 - t0, t2 - t1))
                del back, ref
    finally:
        ray.shutdown()
    print(f"object-store weight transport: {len(named)} bf16 tensors, {nbytes / 1e9:.2f} GB, "
          f"median of {args.repeats}")
    med = {}
    for name, rows in results.items():
        put = statistics.median(r[0] for r in rows)
        get = statistics.median(r[1] for r in rows)
        med[name] = put + get
        print(f"  {name:20s} put {put:6.3f} s   get+decode {get:6.3f} s   total {put + get:6.3f} s")
    base, ours = med["torch (pickled)"], med["numpy wire (ours)"]
    print(f"  speed-up of the numpy wire format: {base / ours:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
