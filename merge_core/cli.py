"""Command line: python -m merge_core BASE ADAPTER [OUTPUT] [options].

BASE and ADAPTER are local folders or Hub IDs (owner/name, optionally @revision); BASE may
be "-" to use the base the adapter names. With --push and no OUTPUT (or OUTPUT "-"), the merge
streams Hub to Hub through a bounded disk (merge_core.stream_push).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidOptionError, MergeError, StreamVerificationError, explain_os_error
from .outputs import check_output_target
from .plan import COMPUTE_DTYPES, OUTPUT_DTYPES
from .progress import TqdmProgress
from .quant_targets import QUANT_TARGETS

if TYPE_CHECKING:
    from .pipeline import MergeRequest, MergeResult, PushResult
    from .stream_push import StreamPushResult
    from .verify import VerificationReport


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m merge_core",
        description="Merge a LoRA adapter into its base model, streaming shard by shard (W' = W + scale * B @ A).",
    )
    p.add_argument("base", help="base model: local folder or Hub ID (owner/name[@revision]); '-' = the adapter's base")
    p.add_argument(
        "adapter",
        help="LoRA adapter: local folder or Hub ID (owner/name[/subfolder][@revision]); "
        "several: 'a/x,b/y:0.5' (comma-separated, optional :weight), combined with --combine",
    )
    p.add_argument(
        "output",
        nargs="?",
        default="-",
        help="folder to write the merged model into (must not exist unless --overwrite). Left out (or '-') with "
        "--push: no local copy, Hub to Hub through a bounded disk (base shards fetched just in time, each output "
        "shard verified with --verify and uploaded as soon as it is written, one commit)",
    )
    _add_merge_options(p)
    _add_output_options(p)
    return p


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-revision", help="branch, tag or commit of the base repo")
    p.add_argument("--adapter-revision", help="branch, tag or commit of the adapter repo")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", *OUTPUT_DTYPES], help="output dtype (default: the base's)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--device", default="cpu", help="where the merge math runs: cpu or cuda (default cpu)")
    p.add_argument(
        "--compute-dtype",
        default="float64",
        choices=list(COMPUTE_DTYPES),
        help="precision of W + scale*B@A before rounding once to the output dtype (default float64)",
    )
    p.add_argument(
        "--combine",
        default="stack",
        help="how several adapters combine: stack (sum of weighted deltas, "
        "default) or a PEFT add_weighted_adapter type: linear, cat, svd, ties, ties_svd, dare_linear, "
        "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd",
    )
    p.add_argument("--density", type=float, help="with ties/dare/magnitude_prune combinations")
    p.add_argument("--svd-rank", type=int, help="with *_svd combinations")
    p.add_argument("--seed", type=int, default=0, help="with dare combinations (reproducible masks)")
    p.add_argument(
        "--quantized-base",
        default="dequantized",
        choices=list(QUANT_TARGETS),
        help="what a quantized (bitsandbytes/FP8) base becomes: "
        + "; ".join(f"{k} = {v}" for k, v in QUANT_TARGETS.items()),
    )
    p.add_argument(
        "--original-base",
        metavar="BASE_ID",
        default="",
        help="with --quantized-base original: the full-precision model to merge into (default: the quantized "
        "repo's model card base_model)",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (atomically)")
    p.add_argument(
        "--verify", action="store_true", help="verify the merged files afterwards; exit code 1 if a check fails"
    )
    p.add_argument(
        "--functional",
        default="auto",
        choices=["auto", "always", "never"],
        help="with --verify: compare logits with PeftModel(base, adapter) when it fits in memory (auto), always, "
        "or never",
    )
    p.add_argument("--gguf", metavar="TYPE[,TYPE]", default="", help=_gguf_help())
    p.add_argument("--push", metavar="REPO_ID", help="push the merged model to this Hub repo in one commit")
    p.add_argument(
        "--max-disk",
        metavar="SIZE",
        help="streamed push (no OUTPUT): the disk the pipeline may use, e.g. 20GB "
        "(default: what is free minus 1 GiB); refused up front when it cannot fit",
    )
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.add_argument(
        "--push-mode",
        default="new",
        choices=["new", "update", "pr"],
        help="with --push: new repo (default), update an existing repo, or open a pull request",
    )
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--json", action="store_true", help="print the merge report (and verification) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _gguf_help() -> str:
    from .gguf_export import supported_architectures
    from .gguf_outputs import GGUF_HELP

    return GGUF_HELP.format(archs=", ".join(supported_architectures()))


def _token() -> str | None:
    # HF_TOKEN or the token saved by `hf auth login`; passed explicitly, never printed.
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return None


def _request(args: argparse.Namespace, token: str | None) -> MergeRequest:
    from .gguf_outputs import parse_gguf_types
    from .pipeline import MergeRequest

    request = MergeRequest(
        adapter=args.adapter,
        base="" if args.base == "-" else args.base,
        adapter_revision=args.adapter_revision,
        base_revision=args.base_revision,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        compute_dtype=args.compute_dtype,
        device=args.device,
        token=token,
        endpoint=args.endpoint,
        combination=args.combine,
        density=args.density,
        svd_rank=args.svd_rank,
        seed=args.seed,
        gguf_types=parse_gguf_types(args.gguf),
        quantized_target=args.quantized_base,
        original_base=args.original_base,
    )
    request.options()  # a bad option (shard size, device, dtype) is refused before any work
    return request


def _protected(request: MergeRequest) -> list[tuple[str, Path]]:
    """Every local input folder named on the command line, and the Hub cache downloads go to.
    The executor checks the resolved folders again (e.g. a base the adapter declares)."""
    from .hub import parse_source
    from .pipeline import parse_adapter_list

    protected = [("the Hub cache that holds the downloaded inputs", request.hub_cache())]
    named = [("the base model", request.base)] if request.base else []
    named += [("an adapter", spec) for spec, _ in parse_adapter_list(request.adapter)]
    for what, text in named:
        try:
            source = parse_source(text)
        except ValueError:
            continue  # not a usable input: the pipeline says why, before writing anything
        if isinstance(source, Path):
            protected.append((what, source))
    return protected


def _merge(
    args: argparse.Namespace, token: str | None, progress: TqdmProgress
) -> tuple[MergeResult, PushResult | None]:
    """Output guard and push preflight first (nothing read, downloaded or written yet), then
    the merge, then the push."""
    from .pipeline import preflight_push, push_merged, run_merge

    request = _request(args, token)
    output = check_output_target(args.output, protected=_protected(request), overwrite=args.overwrite)
    target = None
    if args.push:
        target = preflight_push(
            args.push, token=token, mode=args.push_mode, private=args.private, endpoint=args.endpoint
        )
    result = run_merge(
        request,
        output.parent,
        progress,
        output_dir=output,
        overwrite=args.overwrite,
        verify=args.verify,
        functional=args.functional,
    )
    try:
        if target is None:
            return result, None
        if result.verification is not None and not result.verification.passed:
            print(result.verification.to_text())
            raise MergeError("Verification failed, so nothing was pushed. See the table above.")
        pushed = push_merged(
            result,
            target.repo_id,
            token=token or "",
            private=args.private,
            mode=target.mode,
            endpoint=args.endpoint,
            progress=progress,
        )
        return result, pushed
    finally:
        result.inputs.release()


def _print(args: argparse.Namespace, result: MergeResult, pushed: PushResult | None) -> None:
    report, verification = result.report, result.verification
    if args.json:
        data = report.to_dict()
        if verification is not None:
            data["verification"] = verification.to_dict()
        if result.gguf_files:
            data["gguf_files"] = {qtype: str(path) for qtype, path in result.gguf_files.items()}
        if pushed is not None:
            data["push"] = vars(pushed)
        print(json.dumps(data, indent=2, default=str))
        return
    print(report.summary())
    for qtype, path in result.gguf_files.items():
        print(f"  gguf {qtype}: {path}")
    if verification is not None:
        print()
        print(verification.to_text())
    if pushed is not None:
        pr = f", pull request {pushed.pr_url}" if pushed.pr_url else ""
        print(f"\npushed: {pushed.repo_url} (commit {pushed.commit_oid[:12]}){pr}")


def _passed(verification: VerificationReport | None) -> bool:
    return verification is None or verification.passed


@contextmanager
def _library_bars(*, shown: bool) -> Iterator[None]:
    """--quiet also hides the bars transformers draws itself ("Loading weights" of the checks); restored after,
    since the setting is process-wide. huggingface_hub's bars never show: downloads report through ours."""
    from transformers.utils import logging as hf_logging

    was_shown = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown and not shown:
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0: merged (and verified/pushed when asked); 1: a verification check failed;
    2: refused or failed, with one sentence on stderr and nothing left behind."""
    args = build_parser().parse_args(argv)
    _print_paths_as_given()
    progress = TqdmProgress(disable=args.quiet)
    with _library_bars(shown=not args.quiet):
        return _run(args, progress)


def _run(args: argparse.Namespace, progress: TqdmProgress) -> int:
    if args.output == "-":
        return _main_streamed(args, progress)
    try:
        result, pushed = _merge(args, _token(), progress)
    except (MergeError, ValueError) as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # whatever the operating system refused, said in one sentence
        progress.close()
        where = exc.filename or args.output
        print(f"error: {explain_os_error(exc, 'read or write', where)}", file=sys.stderr)
        return 2
    progress.close()
    _print(args, result, pushed)
    return 0 if _passed(result.verification) else 1


def _print_paths_as_given() -> None:
    """A path of bytes that are not UTF-8 reaches Python as surrogate escapes (PEP 383); a strict UTF-8 stdout
    (any UTF-8 locale but C.UTF-8) would fail on the summary after the merge succeeded. Print the bytes back."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")


def _main_streamed(args: argparse.Namespace, progress: TqdmProgress) -> int:
    """No OUTPUT (or '-'): Hub to Hub with no local copy; the same exit codes and one-sentence errors."""
    from .options import parse_size
    from .pipeline import stream_push

    try:
        if not args.push:
            raise InvalidOptionError("Give an OUTPUT folder, or --push OWNER/NAME to stream Hub to Hub.")
        if args.gguf:
            raise InvalidOptionError(
                "--gguf reads the merged files, which a streamed push does not keep; give an OUTPUT folder."
            )
        request = _request(args, _token())
        max_disk = parse_size(args.max_disk) if args.max_disk else None
        result = stream_push(
            request,
            args.push,
            mode=args.push_mode,
            private=args.private,
            max_disk=max_disk,
            progress=progress,
            verify=args.verify,
        )
    except StreamVerificationError as exc:
        progress.close()
        print(exc.report.to_text())  # type: ignore[attr-defined]
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (MergeError, ValueError, OSError) as exc:
        progress.close()
        message = explain_os_error(exc, "read or write", exc.filename) if isinstance(exc, OSError) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    progress.close()
    _print_streamed(args, result)
    return 0


def _print_streamed(args: argparse.Namespace, result: StreamPushResult) -> None:
    report, pushed, verification = result.report, result.push, result.verification
    if args.json:
        data = report.to_dict() | {"push": vars(pushed), "peak_disk_bytes": result.peak_disk_bytes}
        if verification is not None:
            data["verification"] = verification.to_dict()
        print(json.dumps(data, indent=2, default=str))
        return
    print(report.summary())
    if verification is not None:
        print()
        print(verification.to_text())
    print(f"peak disk {result.peak_disk_bytes / 1e9:.3f} GB of a {result.disk_budget / 1e9:.3f} GB budget")
    print(f"\npushed: {pushed.repo_url} (commit {pushed.commit_oid[:12]})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
