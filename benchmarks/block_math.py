#!/usr/bin/env python3
"""Nanoseconds per element of one row block's arithmetic, the way the engine does it, on one thread.

    python benchmarks/block_math.py [--cols 2560] [--rank 16] [--threads 1]

Rows: the float64 path (widen the bf16 base, addmm the rank-r delta, round to bf16) at several block
sizes; the same in float32; and the cheapest per-element certificate we found for a float32 result
(is the float32 value farther than its error bound from every bf16 rounding boundary? in torch eager
ops: offset and mask the low 16 bits, min per 64-element chunk, magnitude floor from the rounded
output, then gather the flagged chunks). It measures cost only: the certificate's break-even.
"""

from __future__ import annotations

import argparse
import time

import torch


def _best(fn, n: int = 7) -> float:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def _paths(rows: int, cols: int, rank: int) -> dict[str, float]:
    numel = rows * cols
    w = (torch.randn(rows, cols) * 0.02).bfloat16()
    left, right = torch.randn(rows, rank) * 0.05, torch.randn(rank, cols) * 0.05
    left64, right64 = left.double(), right.double()
    w64, w32 = torch.empty(rows, cols, dtype=torch.float64), torch.empty(rows, cols)
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    bits, out16, mag16 = w32.view(torch.int32), out.view(torch.int16), torch.empty(rows, cols, dtype=torch.int16)

    def f64() -> None:
        w64.copy_(w)
        w64.addmm_(left64, right64, alpha=2.0)
        out.copy_(w64)

    def f32() -> None:
        w32.copy_(w)
        w32.addmm_(left, right, alpha=2.0)
        out.copy_(w32)

    def certificate() -> None:
        bits.sub_(0x8000 - 48).bitwise_and_(0xFFFF)
        low = bits.view(-1, 64).amin(1)
        torch.bitwise_and(out16, 0x7FFF, out=mag16)
        small = mag16.view(-1, 64).amin(1)
        flagged = ((low <= 96) | (small < 0x3680)).nonzero().squeeze(1)
        bits.view(-1, 64)[flagged]
        mag16.view(-1, 64)[flagged]

    def f32_certified() -> None:
        f32()
        certificate()

    return {name: _best(fn) * 1e9 / numel for name, fn in [("f64", f64), ("f32", f32), ("f32+cert", f32_certified)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cols", type=int, default=2560)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"ns per element, {args.threads} thread(s), {args.cols} columns, rank {args.rank}")
    print("| block elements | float64 path | float32 path | float32 + certificate |")
    print("|---:|---:|---:|---:|")
    for elements in (8 << 20, 4 << 20, 2 << 20, 1 << 20, 1 << 19, 1 << 18):
        rows = max(1, elements // args.cols)
        r = _paths(rows, args.cols, args.rank)
        print(f"| {rows * args.cols:,} | {r['f64']:.2f} | {r['f32']:.2f} | {r['f32+cert']:.2f} |")


if __name__ == "__main__":
    main()
