#!/usr/bin/env python3
"""What one LoRA-merged projection costs, op by op, on one thread (milliseconds per call).

    python benchmarks/op_costs.py [--rows 6912] [--cols 2560] [--rank 16]

The merge thread widens the stored bf16 rows to float64 and adds the rank-r product (addmm); the writer
thread rounds to bf16. The float32 ops and a bf16 memcpy (what `cp` does per byte) are the yardsticks.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def _time(name: str, op: Callable[[], object], repeats: int = 5) -> None:
    op()
    started = time.perf_counter()
    for _ in range(repeats):
        op()
    print(f"{name:28s} {(time.perf_counter() - started) / repeats * 1000:7.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=6912)
    p.add_argument("--cols", type=int, default=2560)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    n, m, r = args.rows, args.cols, args.rank
    w = torch.randn(n, m).bfloat16()
    b, a = torch.randn(n, r) * 0.01, torch.randn(r, m) * 0.01
    b64, a64 = b.double(), a.double()
    w64, w32, out = torch.empty(n, m, dtype=torch.float64), torch.empty(n, m), torch.empty(n, m, dtype=torch.bfloat16)
    print(f"{n} x {m} = {n * m / 1e6:.1f}M elements, rank {r}, one thread")
    _time("widen bf16 -> float64", lambda: w64.copy_(w))
    _time("addmm float64", lambda: w64.addmm_(b64, a64, alpha=2.0))
    _time("round float64 -> bf16", lambda: out.copy_(w64))
    _time("widen bf16 -> float32", lambda: w32.copy_(w))
    _time("addmm float32", lambda: w32.addmm_(b, a, alpha=2.0))
    _time("round float32 -> bf16", lambda: out.copy_(w32))
    _time("memcpy bf16", lambda: out.copy_(w))


if __name__ == "__main__":
    main()
