#!/usr/bin/env python3
"""Time and peak RSS of the layer-by-layer function rows (merge_core.layer_stream) on a merged checkpoint.

    python benchmarks/layer_rows.py BASE ADAPTER MERGED [--json OUT.json]

BASE is the base folder the merge read (symlinks to the shards are fine), MERGED the merged folder. The rows are
the ones `--verify` shows for a causal LM too large for memory: logits and top-1 of the merged model against
PeftModel(base, adapter) unmerged, and the adapter's effect, each model holding one decoder layer at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("merged", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from merge_core.layer_stream import streamed_logit_checks
    from merge_core.plan import build_plan

    torch.set_num_threads(2)
    start = time.perf_counter()
    plan = build_plan(args.base, args.adapter, check_finite=False)
    planned = time.perf_counter() - start
    rss_before = _rss_mib()
    start = time.perf_counter()
    checks = streamed_logit_checks(plan, args.merged, why="benchmark")
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {
        "plan_s": round(planned, 1),
        "rows_s": round(elapsed, 1),
        "rss_before_rows_mib": round(rss_before),
        "peak_rss_mib": round(peak),
        "checks": [[c.name, c.status, c.value, c.detail] for c in checks],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
