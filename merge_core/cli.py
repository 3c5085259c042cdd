"""Command line: python -m merge_core BASE ADAPTER OUTPUT [options].

BASE and ADAPTER are local folders or Hub IDs (owner/name, optionally @revision); BASE may
be "-" to use the base the adapter names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import MergeError
from .merge import check_output_dir
from .plan import COMPUTE_DTYPES, OUTPUT_DTYPES
from .progress import TqdmProgress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m merge_core",
        description="Merge a LoRA adapter into its base model, streaming shard by shard (W' = W + scale * B @ A).",
    )
    p.add_argument("base", help="base model: local folder or Hub ID (owner/name[@revision]); '-' = the adapter's base")
    p.add_argument("adapter", help="LoRA adapter: local folder or Hub ID (owner/name[/subfolder][@revision]); "
                   "several: 'a/x,b/y:0.5' (comma-separated, optional :weight), combined with --combine")
    p.add_argument("output", help="folder to write the merged model into (must not exist unless --overwrite)")
    p.add_argument("--base-revision", help="branch, tag or commit of the base repo")
    p.add_argument("--adapter-revision", help="branch, tag or commit of the adapter repo")
    p.add_argument("--dtype", default="auto", choices=["auto", *OUTPUT_DTYPES], help="output dtype (default: the base's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--device", default="cpu", help="where the merge math runs: cpu or cuda (default cpu)")
    p.add_argument(
        "--compute-dtype",
        default="float64",
        choices=list(COMPUTE_DTYPES),
        help="precision of W + scale*B@A before rounding once to the output dtype (default float64)",
    )
    p.add_argument("--combine", default="stack", help="how several adapters combine: stack (sum of weighted deltas, "
                   "default) or a PEFT add_weighted_adapter type: linear, cat, svd, ties, ties_svd, dare_linear, "
                   "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd")
    p.add_argument("--density", type=float, help="with ties/dare/magnitude_prune combinations")
    p.add_argument("--svd-rank", type=int, help="with *_svd combinations")
    p.add_argument("--seed", type=int, default=0, help="with dare combinations (reproducible masks)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (atomically)")
    p.add_argument("--verify", action="store_true", help="verify the merged files afterwards; exit code 1 if a check fails")
    p.add_argument(
        "--functional",
        default="auto",
        choices=["auto", "always", "never"],
        help="with --verify: compare logits with PeftModel(base, adapter) when it fits in memory (auto), always, or never",
    )
    p.add_argument("--push", metavar="REPO_ID", help="push the merged model to this Hub repo in one commit")
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.add_argument("--push-mode", default="new", choices=["new", "update", "pr"],
                   help="with --push: new repo (default), update an existing repo, or open a pull request")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--json", action="store_true", help="print the merge report (and verification) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _token() -> Optional[str]:
    # HF_TOKEN or the token saved by `hf auth login`; passed explicitly, never printed.
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .pipeline import MergeRequest, push_merged, run_merge

    args = build_parser().parse_args(argv)
    progress = TqdmProgress(disable=args.quiet)
    token = _token()
    pushed = None
    verification = None
    temporary: list[Path] = []
    try:
        output = Path(args.output).absolute()
        check_output_dir(output, args.overwrite)
        request = MergeRequest(
            adapter=args.adapter, base="" if args.base == "-" else args.base,
            adapter_revision=args.adapter_revision, base_revision=args.base_revision, dtype=args.dtype,
            max_shard_size=args.max_shard_size, compute_dtype=args.compute_dtype, device=args.device,
            token=token, endpoint=args.endpoint, combination=args.combine, density=args.density,
            svd_rank=args.svd_rank, seed=args.seed,
        )
        result = run_merge(request, output.parent, progress, output_dir=output, overwrite=args.overwrite,
                           verify=args.verify, functional=args.functional)
        temporary = result.temporary
        report, verification = result.report, result.verification
        if args.push:
            if verification is not None and not verification.passed:
                raise MergeError("Verification failed, so nothing was pushed. See the table above.")
            pushed = push_merged(result, args.push, token=token or "", private=args.private, mode=args.push_mode,
                                 endpoint=args.endpoint, progress=progress)
    except (MergeError, ValueError) as exc:
        progress.close()
        if verification is not None:
            print(verification.to_text())
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for path in temporary:
            shutil.rmtree(path, ignore_errors=True)
    progress.close()
    if args.json:
        data = report.to_dict()
        if verification is not None:
            data["verification"] = verification.to_dict()
        if pushed is not None:
            data["push"] = vars(pushed)
        print(json.dumps(data, indent=2, default=str))
    else:
        print(report.summary())
        if verification is not None:
            print()
            print(verification.to_text())
        if pushed is not None:
            print(f"\npushed: {pushed.repo_url} (commit {pushed.commit_oid[:12]})" + (f", pull request {pushed.pr_url}" if pushed.pr_url else ""))
    return 1 if verification is not None and not verification.passed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
