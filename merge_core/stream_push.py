"""Hub to Hub through a bounded disk: download base shards just in time, merge one output shard,
pre-upload it, delete what no later shard needs, and land everything in ONE commit at the end.

Only metadata is fetched up front (adapter, the base's small files and safetensors headers), so the
plan is validated before any shard moves. The disk then holds about two input shards (the one being
read and the one prefetched), two output shards (the one uploading and the one being written), the
adapter and the small files. Uploaded-but-uncommitted LFS objects are invisible in the repository,
and the Hub keeps them: a rerun of an interrupted push sends only the shards it does not hold yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .card import build_model_card
from .checkpoint import BaseTensor
from .disk_budget import (
    DEFAULT_DISK_MARGIN,
    DiskMeter,
    check_budget,
    default_max_disk,
    disk_needed,
    output_shard_bytes,
    shard_needs,
)
from .errors import BaseCheckpointError, InvalidOptionError, StreamVerificationError
from .hub import (
    HubClient,
    PushResult,
    PushTarget,
    RepoRef,
)
from .hub_base import hub_base_files
from .inputs import (
    BaseInput,
    HubSession,
    MergeRequest,
    ResolvedInputs,
    base_source,
    resolve_adapter,
)
from .merge import ShardHooks, execute_plan
from .plan import MergePlan, build_plan
from .progress import ProgressCallback, ProgressUpdate, no_progress, serialized
from .report import MergeReport
from .safetensors_io import read_header
from .stream_function import StreamedFunctionRows, held_bytes
from .stream_transfer import Fetcher, StreamBase, Uploader, retry_hint
from .verify_report import VerificationReport
from .verify_stream import ShardVerifier


@dataclass
class StreamPushResult:
    """What a streamed push did; unpacks as ``report, pushed = stream_merge_push(...)``."""

    report: MergeReport
    push: PushResult
    peak_disk_bytes: int  # the most bytes the pipeline held under its folders at once (sampled)
    disk_budget: int
    disk_needed: int  # the up-front estimate the budget was checked against
    uploaded: list[str] = field(default_factory=list)
    already_on_hub: list[str] = field(default_factory=list)  # resumed: the Hub held these bytes
    downloaded: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)  # base shards found on disk, not downloaded
    verification: VerificationReport | None = None  # with verify=True: built shard by shard (verify_stream)

    def __iter__(self):
        return iter((self.report, self.push))


def _resolve_metadata(
    request: MergeRequest, workdir: Path, progress: ProgressCallback
) -> tuple[ResolvedInputs, Any, StreamBase]:
    """The adapter (downloaded), the base's small files and safetensors headers: no base shard yet."""
    if request.gguf_types or request.quantized_target == "original":
        raise InvalidOptionError(
            "GGUF files and the 'original' target are not streamed; push without them, or merge to a folder first."
        )
    hub = HubSession(request)
    progress(ProgressUpdate("resolve", 0, 2, "", "adapter"))
    inputs = resolve_adapter(request, hub, workdir)
    try:
        source, _text = base_source(request, inputs.adapter_dir)
        if not isinstance(source, RepoRef):
            raise InvalidOptionError(
                "A streamed push reads the base from the Hub; give the base as a Hub ID owner/name."
            )
        progress(ProgressUpdate("resolve", 1, 2, "", "base"))
        inputs.options = request.options(
            base_name=str(source), adapter_name=inputs.adapter_id, adapter_revision=inputs.adapter_revision
        )
        meta = hub_base_files(source, hub.client, cache_dir=request.cache_dir)
        if meta.checkpoint is None:
            raise InvalidOptionError(
                "This quantized base's shapes are only known from its shards, so it cannot be streamed; "
                "merge it to a folder first, then push."
            )
        inputs.base = BaseInput(meta.folder, source.repo_id, source.revision, hub.client.card_data(source))
    except BaseException:
        inputs.release()
        raise
    progress(ProgressUpdate("resolve", 2, 2, "", "done"))
    sizes = {s: int(meta.files.get(s, 0)) for s in meta.headers}
    return inputs, meta.checkpoint, StreamBase(source, meta.sha, meta.folder, sizes, owned_cache=False)


def locate_shard(plan: MergePlan, path: Path) -> None:
    """Point the plan's tensors of one downloaded shard at their absolute offsets in the file.

    A headers-only checkpoint (hub_base.headers_checkpoint) holds the Hub's data offsets, which
    count from the end of the header; the file on disk tells the header's length, and must agree
    with everything else the plan was built from.
    """
    header = read_header(path)
    located: dict[str, BaseTensor] = {}
    for name, planned in plan.base.tensors.items():
        if Path(planned.shard) != path:
            continue
        real = header.tensors.get(name)
        data_start = (real.begin - planned.info.begin) if real is not None else -1
        if (
            real is None
            or (real.dtype, real.shape, real.nbytes) != (planned.info.dtype, planned.info.shape, planned.info.nbytes)
            or data_start < 8
        ):
            raise BaseCheckpointError(
                f"The downloaded {path.name} does not match the header read before the merge (tensor {name}); "
                "the base repository changed during the push: run it again."
            )
        located[name] = BaseTensor(path, real)
    plan.base.tensors.update(located)
    for t in plan.tensors:
        if t.base is not None and Path(t.base.shard) == path:
            t.base = located[t.base.info.name]


def _pipeline(
    plan: MergePlan,
    fetcher: Fetcher,
    uploader: Uploader,
    output_dir: Path,
    *,
    meter: DiskMeter,
    budget: int,
    progress: ProgressCallback,
    verifier: ShardVerifier | None = None,
    function: StreamedFunctionRows | None = None,
) -> MergeReport:
    """execute_plan with hooks: base shards just in time (the next one prefetched), each output shard
    handed to the uploader as soon as it is complete and verified while it uploads (its base shards
    still on disk), consumed base shards deleted then, the next shard merged once the previous is sent."""
    needs = shard_needs(plan)
    last_use = {path: i for i, need in enumerate(needs) for path in need}
    n, located, out_bytes = len(needs), set[Path](), output_shard_bytes(plan)

    def before(i: int, _tensors: list) -> None:
        fetcher.wait(needs[i])
        for path in sorted(needs[i] - located):
            locate_shard(plan, path)
            located.add(path)
            if function is not None:
                function.base_arrived(path)
        held = meter.sample()
        # Prefetch only within the budget; otherwise the next shard downloads once this one's inputs are gone.
        if i + 1 < n and held + fetcher.missing_bytes(needs[i + 1]) + out_bytes[i] <= budget:
            fetcher.want(needs[i + 1])

    def after(i: int, path: Path) -> None:
        meter.sample()
        uploader.submit(path)
        if verifier is not None:
            verifier.shard_written(path)
        consumed = [used for used in sorted(needs[i]) if last_use[used] == i]
        if function is None:
            for used in consumed:
                fetcher.drop(used)
        else:  # the layers that read these shards run first (some shards are held one more shard)
            function.shard_written(path)
            function.after_shard(consumed, path, drop=fetcher.drop, uploader=uploader, last=i == n - 1)
        # At most this shard uploading while the next is merged: the disk bound. The last one must be sent
        # before the staging folder is renamed into place.
        uploader.wait(keep=0 if i == n - 1 else 1)

    try:
        report = execute_plan(
            plan, output_dir, overwrite=True, progress=progress, hooks=ShardHooks(before, after), check_space=False
        )
        uploader.wait()
    finally:
        fetcher.close()
        uploader.close()
    return report


def _merge_and_verify(
    plan: MergePlan,
    fetcher: Fetcher,
    uploader: Uploader,
    workdir: Path,
    *,
    meter: DiskMeter,
    budget: int,
    progress: ProgressCallback,
    verify: bool,
) -> tuple[MergeReport, VerificationReport | None]:
    """The pipeline into ``workdir``/merged; with ``verify``, the table: numerics shard by shard and the
    function rows layer by layer, both while each shard's inputs are on disk."""
    output_dir = workdir / "merged"
    verifier = ShardVerifier(plan, progress=progress) if verify else None
    function = StreamedFunctionRows(plan, workdir, device=plan.options.device) if verify else None
    try:
        report = _pipeline(
            plan,
            fetcher,
            uploader,
            output_dir,
            meter=meter,
            budget=budget,
            progress=progress,
            verifier=verifier,
            function=function,
        )
    finally:
        if function is not None:
            function.close()
    if verifier is None or function is None:
        return report, None
    return report, verifier.report(output_dir, function.rows())


def _commit(
    target: PushTarget,
    output_dir: Path,
    *,
    inputs: ResolvedInputs,
    uploader: Uploader,
    report: MergeReport,
    verification: VerificationReport | None,
    progress: ProgressCallback,
) -> PushResult:
    """The card, then ONE commit: the pre-uploaded shards plus config, index, tokenizer and card."""
    card = build_model_card(
        report,
        verification,
        repo_id=target.repo_id,
        base_id=inputs.base.name,
        base_revision=inputs.base.revision,
        adapter_id=inputs.adapter_id,
        adapter_revision=inputs.adapter_revision,
        base_card=inputs.base.card,
    )
    card.save(output_dir / "README.md")
    small = uploader.small_operations([(p.name, p) for p in sorted(output_dir.iterdir()) if p.is_file()])
    sizes = sum(Path(str(op.path_or_fileobj)).stat().st_size for op in small)
    what = f"one commit: {len(uploader.operations)} pre-uploaded shards and {len(small)} small files"
    progress(ProgressUpdate("commit", 0, sizes, "B", what))
    pushed = uploader.commit(
        small,
        message=f"Merge {inputs.adapter_id} into {inputs.base.name}",
        description="Merged with LoRA Merge Space (merge_core), streamed: one commit with weights, config, "
        "tokenizer and card.",
    )
    progress(ProgressUpdate("commit", sizes, sizes, "B", f"committed {pushed.commit_oid[:12]}"))
    return pushed


def _refuse_failed(verification: VerificationReport | None, target: PushTarget) -> None:
    if verification is not None and not verification.passed:
        raise StreamVerificationError(
            f"Verification failed, so nothing was committed.{retry_hint(target)}", report=verification
        )


def _disk_roots(workdir: Path, cache_dir: Path) -> list[Path]:
    """The folders whose bytes count against the budget (the cache once, also when inside the workdir)."""
    return [workdir] + ([] if cache_dir.resolve().is_relative_to(workdir.resolve()) else [cache_dir])


def _checked_budget(
    plan: MergePlan, base: StreamBase, adapter_dir: Path, workdir: Path, *, max_disk: int | None, verify: bool
) -> tuple[int, int]:
    """(bytes the pipeline needs, the budget), refused up front when the first exceeds the second."""
    needed = disk_needed(plan, folder=base.folder, sizes=base.sizes, adapter_dir=adapter_dir)
    if verify:  # the function rows may hold a base shard one more output shard
        needed += held_bytes(plan, folder=base.folder, sizes=base.sizes)
    budget = default_max_disk(workdir) if max_disk is None else int(max_disk)
    check_budget(needed, budget)
    return needed, budget


def stream_merge_push(
    request: MergeRequest,
    target: PushTarget,
    workdir: Path,
    *,
    max_disk: int | None = None,
    progress: ProgressCallback = no_progress,
    verify: bool = False,
) -> StreamPushResult:
    """Merge a Hub base with an adapter and push the result to ``target`` (preflighted, see
    HubClient.preflight_push) in one commit, holding about two input and two output shards on disk.

    Downloads go to ``request.cache_dir`` (default: ``workdir``/hub-cache, whose consumed shards are
    deleted); ``max_disk`` defaults to the free space at ``workdir`` less DEFAULT_DISK_MARGIN.
    ``verify``: each output shard is verified while it uploads (merge_core.verify_stream); a failed check
    raises StreamVerificationError, with the table, before anything is committed.
    """
    (workdir := Path(workdir)).mkdir(parents=True, exist_ok=True)
    progress = serialized(progress)
    owned = request.cache_dir is None
    request = replace(request, cache_dir=Path(request.cache_dir or workdir / "hub-cache"))
    with DiskMeter(_disk_roots(workdir, Path(request.cache_dir))) as meter:
        inputs, checkpoint, base = _resolve_metadata(request, workdir, progress)
        base.owned_cache = owned
        try:
            plan = build_plan(checkpoint, inputs.adapter_dir, inputs.options)
            needed, budget = _checked_budget(plan, base, inputs.adapter_dir, workdir, max_disk=max_disk, verify=verify)
            client = HubClient(request.token, request.endpoint)
            client.create_target(target)
            fetcher = Fetcher(client, base, request.cache_dir, progress)
            uploader = Uploader(client, target, plan.output_nbytes, progress)
            report, verification = _merge_and_verify(
                plan, fetcher, uploader, workdir, meter=meter, budget=budget, progress=progress, verify=verify
            )
            _refuse_failed(verification, target)
            pushed = _commit(
                target,
                workdir / "merged",
                inputs=inputs,
                uploader=uploader,
                report=report,
                verification=verification,
                progress=progress,
            )
        finally:
            inputs.release()
    return StreamPushResult(
        report=report,
        push=pushed,
        peak_disk_bytes=meter.peak,
        disk_budget=budget,
        disk_needed=needed,
        uploaded=sorted(uploader.uploaded),
        already_on_hub=sorted(uploader.already),
        downloaded=sorted(fetcher.downloaded),
        cached=sorted(fetcher.cached),
        verification=verification,
    )


__all__ = [
    "DEFAULT_DISK_MARGIN",
    "StreamPushResult",
    "check_budget",
    "default_max_disk",
    "disk_needed",
    "output_shard_bytes",
    "shard_needs",
    "stream_merge_push",
]
