"""Command line: python -m merge_core BASE ADAPTER OUTPUT [options]."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import MergeError
from .merge import check_output_dir, execute_plan
from .plan import COMPUTE_DTYPES, OUTPUT_DTYPES, MergeOptions, build_plan, parse_size
from .progress import TqdmProgress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m merge_core",
        description="Merge a LoRA adapter into its base model, streaming shard by shard (W' = W + scale * B @ A).",
    )
    p.add_argument("base", help="base model: a local folder with config.json and safetensors weights")
    p.add_argument("adapter", help="LoRA adapter: a local folder with adapter_config.json and adapter weights")
    p.add_argument("output", help="folder to write the merged model into (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="auto", choices=["auto", *OUTPUT_DTYPES], help="output dtype (default: the base's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--device", default="cpu", help="where the merge math runs: cpu or cuda (default cpu)")
    p.add_argument(
        "--compute-dtype",
        default="float64",
        choices=list(COMPUTE_DTYPES),
        help="precision of W + scale*B@A before rounding once to the output dtype (default float64)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (atomically)")
    p.add_argument("--verify", action="store_true", help="verify the merged files afterwards; exit code 1 if a check fails")
    p.add_argument(
        "--functional",
        default="auto",
        choices=["auto", "always", "never"],
        help="with --verify: compare logits with PeftModel(base, adapter) when it fits in memory (auto), always, or never",
    )
    p.add_argument("--json", action="store_true", help="print the merge report (and verification) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    progress = TqdmProgress(disable=args.quiet)
    try:
        options = MergeOptions(
            dtype=args.dtype,
            max_shard_size=parse_size(args.max_shard_size),
            compute_dtype=args.compute_dtype,
            device=args.device,
            base_name=args.base,
            adapter_name=args.adapter,
        )
        output = Path(args.output)
        check_output_dir(output, args.overwrite)
        plan = build_plan(args.base, args.adapter, options)
        report = execute_plan(plan, output, overwrite=args.overwrite, progress=progress)
        verification = None
        if args.verify:
            from .verify import verify_merge

            verification = verify_merge(plan, output, functional=args.functional, device=args.device, progress=progress)
    except (MergeError, ValueError) as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress.close()
    if args.json:
        data = report.to_dict()
        if verification is not None:
            data["verification"] = verification.to_dict()
        print(json.dumps(data, indent=2, default=str))
    else:
        print(report.summary())
        if verification is not None:
            print()
            print(verification.to_text())
    return 1 if verification is not None and not verification.passed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
