"""One merge job end to end, shared by the app and the CLI: resolve, preflight, download,
merge, verify, card; then, separately, model checks (GPU-worthy) and the push.

This module orchestrates only: Hub IO and push rules live in ``hub``, the plan in ``plan``,
the writing in ``merge``. It is also the one import of the app, so it re-exports the names
a front end needs (see ``__all__``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from .adapter import load_adapter_config
from .card import build_model_card, read_local_card_data
from .checkpoint import BaseCheckpoint, BaseTensor, read_json
from .combine import COMBINATION_TYPES
from .errors import InvalidOptionError, MergeError, PushError, UnsafeOutputError, explain_os_error
from .frontend import (
    LIMITS,
    Limits,
    SessionBusyError,
    check_limits,
    progress_adapter,
    sample_note,
    session_slot,
    sizes_markdown,
    verdict_markdown,
)
from .generate import GenerationSettings, SampleGeneration, generate_samples, load_models
from .hub import (
    BASE_SMALL_PATTERNS,
    HubClient,
    PushMode,
    PushResult,
    PushTarget,
    RepoRef,
    adapter_files,
    base_weight_files,
    matching,
    parse_source,
)
from .locks import Claim
from .merge import check_disk, execute_plan
from .plan import MergeOptions, build_plan, parse_size
from .progress import ProgressCallback, ProgressUpdate, no_progress
from .report import MergeReport
from .safetensors_io import TensorInfo
from .verify import Check, VerificationReport, functional_budget, functional_checks, verify_merge
from .workdirs import new_combined_folder, new_workdir, sweep_combined, sweep_workdirs


@dataclass
class MergeRequest:
    adapter: str
    base: str = ""
    adapter_revision: Optional[str] = None
    base_revision: Optional[str] = None
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    compute_dtype: str = "float64"
    device: str = "cpu"
    token: Optional[str] = field(default=None, repr=False)
    endpoint: Optional[str] = None
    functional: str = "auto"
    # Several adapters: `adapter` lists them, one per line or comma-separated, each
    # optionally with ":weight"; they are combined into one adapter first (merge_core.combine).
    combination: str = "stack"
    density: Optional[float] = None
    svd_rank: Optional[int] = None
    seed: int = 0
    # Server-side safety for a public app: local folders are read only under these roots
    # (None: any folder, as the CLI wants). Hub downloads go to cache_dir when given, so a
    # per-request folder frees them again (default: the shared huggingface_hub cache).
    local_roots: Optional[list[Path]] = None
    cache_dir: Optional[Path] = None

    def __repr__(self) -> str:  # dataclass repr=False on token is not enough if someone formats vars()
        return f"MergeRequest(adapter={self.adapter!r}, base={self.base!r}, dtype={self.dtype!r})"

    def options(self, **names: Any) -> MergeOptions:
        """The merge options, validated (InvalidOptionError names the bad value)."""
        return MergeOptions(dtype=self.dtype, max_shard_size=parse_size(self.max_shard_size),
                            compute_dtype=self.compute_dtype, device=self.device, **names)

    def hub_cache(self) -> Path:
        """The folder that will hold this request's Hub downloads (never a valid output)."""
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)


@dataclass
class AdapterInput:
    """One adapter of the request, as a local folder."""

    folder: Path
    name: str  # the Hub ID (with subfolder) or the path as given
    revision: Optional[str]  # the pinned commit for a Hub adapter
    weight: float = 1.0


@dataclass
class BaseInput:
    folder: Path
    name: str
    revision: Optional[str]
    card: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResolvedInputs:
    """Local folders for base and adapter, validated against each other (preflight done)."""

    base: BaseInput
    adapter_dir: Path  # the one adapter, or the combination of several
    adapter_id: str
    adapter_revision: Optional[str]
    options: MergeOptions
    suggested_name: str = "merged"
    temporary: list[Claim] = field(default_factory=list)  # e.g. a combined adapter; released when done

    def release(self) -> None:
        for claimed in self.temporary:
            claimed.release(remove_folder=True)
        self.temporary.clear()


@dataclass
class MergeResult:
    inputs: ResolvedInputs
    workdir: Path
    output_dir: Path
    report: MergeReport
    verification: Optional[VerificationReport]
    sample: Optional[SampleGeneration] = None
    workdir_claim: Optional[Claim] = field(default=None, repr=False)  # the app's per-request folder

    @property
    def base_dir(self) -> Path:
        return self.inputs.base.folder

    @property
    def adapter_dir(self) -> Path:
        return self.inputs.adapter_dir

    def sizes(self) -> dict[str, float]:
        return {
            "adapter_mb": self.report.adapter_bytes / 1e6,
            "base_gb": self.report.base_bytes / 1e9,
            "merged_gb": self.report.output_bytes / 1e9,
        }

    def write_card(self, repo_id: Optional[str] = None) -> None:
        base = self.inputs.base
        card = build_model_card(self.report, self.verification, repo_id=repo_id, base_id=base.name,
                                base_revision=base.revision, adapter_id=self.inputs.adapter_id,
                                adapter_revision=self.inputs.adapter_revision, base_card=base.card)
        card.save(self.output_dir / "README.md")

    def release(self) -> None:
        """Remove what this merge left on disk: temporary inputs and, for the app, its folder."""
        self.inputs.release()
        if self.workdir_claim is not None:
            self.workdir_claim.release(remove_folder=True)
            self.workdir_claim = None


def _suggest_name(adapter_id: str) -> str:
    name = Path(adapter_id.rstrip("/")).name or "adapter"
    for suffix in ("-lora", "_lora", "-adapter", "_adapter", "-peft"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return f"{name}-merged"


def parse_adapter_list(text: str) -> list[tuple[str, float]]:
    """'a/b, c/d:0.5' or one per line -> [("a/b", 1.0), ("c/d", 0.5)]."""
    entries: list[tuple[str, float]] = []
    for raw in text.replace("\n", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        spec, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                spec = head.strip()
            except ValueError:
                pass
        entries.append((spec, weight))
    if not entries:
        raise ValueError("Enter a LoRA adapter: a Hub ID like owner/name, or a local folder.")
    return entries


def _check_local(path: Path, roots: Optional[list[Path]], what: str) -> Path:
    if roots is None:
        return path
    resolved = path.resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        raise ValueError(f"{what} {str(path)!r} is a local folder, which is not allowed here; "
                         "enter a Hub ID like owner/name.")
    return path


@dataclass
class _Hub:
    """The request's Hub client, made on first use (a local-only merge never needs one)."""

    request: MergeRequest

    @cached_property
    def client(self) -> HubClient:
        return HubClient(self.request.token, self.request.endpoint)


def _fetch_adapter(spec: str, weight: float, revision: Optional[str], hub: _Hub) -> AdapterInput:
    source = parse_source(spec, revision)
    if isinstance(source, Path):
        return AdapterInput(_check_local(source, hub.request.local_roots, "The adapter"), spec, None, weight)
    sha, files = hub.client.resolve(source)
    folder = hub.client.download(source, sha, adapter_files(files, source), cache_dir=hub.request.cache_dir)
    name = source.repo_id + (f"/{source.subfolder}" if source.subfolder else "")
    # Pinned to the commit read, so the card (and the declared base) name exactly what was merged.
    return AdapterInput(folder / source.subfolder, name, sha, weight)


def _combine(adapters: list[AdapterInput], request: MergeRequest, parent: Path) -> tuple[Path, str, Claim]:
    from .combine import AdapterSource, combine_adapters

    claimed = new_combined_folder(parent)
    try:
        folder = combine_adapters([AdapterSource(a.folder, a.weight, a.name) for a in adapters], request.combination,
                                  claimed.folder, density=request.density, svd_rank=request.svd_rank, seed=request.seed)
    except BaseException:
        claimed.release(remove_folder=True)
        raise
    parts = " + ".join(f"{a.weight:g} x {a.name}" + (f"@{a.revision[:12]}" if a.revision else "") for a in adapters)
    return Path(folder), f"{request.combination}({parts})", claimed


def _base_source(request: MergeRequest, adapter_dir: Path) -> tuple[RepoRef | Path, str]:
    """The base as typed, or the one the adapter declares, with the declared-base rules: a
    declared local folder is read only where local folders are allowed (never the server's
    own folders on a public app), and a trainer's path gets a message saying what to do."""
    typed = (request.base or "").strip()
    if typed:
        return parse_source(typed, request.base_revision), typed
    declared = (load_adapter_config(adapter_dir).base_model_name_or_path or "").strip()
    if not declared:
        raise ValueError("The adapter does not name its base model; enter the base model ID.")
    try:
        source = parse_source(declared, request.base_revision)
    except ValueError:
        # Adapters often record the trainer's own folder (e.g. a Colab path) as their base.
        raise ValueError(f"The adapter's config names {declared!r} as its base model, which is not a Hub ID that "
                         "can be used here. Enter the base model's Hub ID.") from None
    if isinstance(source, Path) and request.local_roots is not None:
        try:
            _check_local(source, request.local_roots, "The base model")
        except ValueError:
            raise ValueError(f"The adapter's config names a local folder as its base model ({declared!r}), which "
                             "this app cannot read. Enter the base model's Hub ID in 'Base model'.") from None
    return source, declared


def _preflight_checkpoint(base_dir: Path, headers: dict[str, dict[str, Any]], name: str) -> BaseCheckpoint:
    """A BaseCheckpoint from remote headers, so the plan validates before the shards download."""
    config = read_json(base_dir / "config.json", "the base model's config")
    tensors: dict[str, BaseTensor] = {}
    for shard, entries in sorted(headers.items()):
        for tensor, (dtype, shape, offsets) in entries.items():
            info = TensorInfo(tensor, dtype, tuple(shape), offsets[0], offsets[1])
            tensors[tensor] = BaseTensor(base_dir / shard, info)
    return BaseCheckpoint(path=base_dir, config=config, tensors=tensors,
                          shards=[base_dir / s for s in sorted(headers)], name=name)


def _fetch_hub_base(ref: RepoRef, adapter_dir: Path, options: MergeOptions, hub: _Hub, *, output_parent: Path,
                    progress: ProgressCallback) -> BaseInput:
    """Small files and safetensors headers first; the plan is validated (and the disk checked)
    before any shard is downloaded."""
    client, cache = hub.client, hub.request.cache_dir
    sha, files = client.resolve(ref)
    base_weight_files(files, ref)  # refuses pickle-only repos before any download
    small = matching(files, BASE_SMALL_PATTERNS)
    base_dir = client.download(ref, sha, small, cache_dir=cache)
    headers = client.safetensors_headers(ref, sha)
    preflight = build_plan(_preflight_checkpoint(base_dir, headers, str(ref)), adapter_dir, options)
    shards = sorted(headers)
    shard_bytes = sum(files.get(s, 0) for s in shards)
    check_disk(base_dir, shard_bytes, f"downloading {ref.repo_id}")
    check_disk(output_parent, preflight.output_nbytes)
    base_dir = client.download(ref, sha, small + shards, cache_dir=cache, progress=progress, total_bytes=shard_bytes)
    return BaseInput(Path(base_dir), ref.repo_id, ref.revision, client.card_data(ref))


def _local_base(path: Path, text: str, request: MergeRequest) -> BaseInput:
    folder = _check_local(path, request.local_roots, "The base model")
    return BaseInput(Path(folder), text, None, read_local_card_data(folder))


def _resolve_adapter(request: MergeRequest, hub: _Hub, output_parent: Path) -> ResolvedInputs:
    """The request's adapters as one local adapter folder (combined when there are several)."""
    entries = parse_adapter_list(request.adapter)
    revision = request.adapter_revision if len(entries) == 1 else None
    adapters = [_fetch_adapter(spec, weight, revision, hub) for spec, weight in entries]
    if len(adapters) == 1 and adapters[0].weight == 1.0:
        one, temporary = adapters[0], []
    else:
        folder, adapter_id, claimed = _combine(adapters, request, output_parent)
        one, temporary = AdapterInput(folder, adapter_id, None), [claimed]
    return ResolvedInputs(base=BaseInput(Path(), "", None), adapter_dir=Path(one.folder), adapter_id=one.name,
                          adapter_revision=one.revision, options=request.options(),
                          suggested_name=_suggest_name(adapters[0].name), temporary=temporary)


def resolve_inputs(request: MergeRequest, output_parent: Path, progress: ProgressCallback = no_progress) -> ResolvedInputs:
    """Hub IDs or local folders -> local folders. For Hub IDs the small files come first and the
    merge plan is validated from the safetensors headers before any shard is downloaded."""
    request.options()  # a bad option is refused before anything is read or downloaded
    sweep_combined(output_parent)
    hub = _Hub(request)
    progress(ProgressUpdate("resolve", 0, 2, "", "adapter"))
    inputs = _resolve_adapter(request, hub, output_parent)
    try:
        progress(ProgressUpdate("resolve", 1, 2, "", "base"))
        source, text = _base_source(request, inputs.adapter_dir)
        inputs.options = request.options(base_name=str(source) if isinstance(source, RepoRef) else text,
                                         adapter_name=inputs.adapter_id, adapter_revision=inputs.adapter_revision)
        if isinstance(source, RepoRef):
            inputs.base = _fetch_hub_base(source, inputs.adapter_dir, inputs.options, hub,
                                          output_parent=output_parent, progress=progress)
        else:
            inputs.base = _local_base(source, text, request)
    except BaseException:
        inputs.release()
        raise
    progress(ProgressUpdate("resolve", 2, 2, "", "done"))
    return inputs


def run_merge(request: MergeRequest, workdir: Path, progress: ProgressCallback = no_progress, *,
              output_dir: Optional[Path] = None, overwrite: bool = True, verify: bool = True,
              functional: str = "never") -> MergeResult:
    """Everything up to a verified merged folder with its model card: ``output_dir`` (default
    ``workdir``/merged). The forward-pass checks are off by default: the app runs them on the
    GPU through model_checks; the CLI asks for them here."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = resolve_inputs(request, workdir, progress)
    try:
        plan = build_plan(inputs.base.folder, inputs.adapter_dir, inputs.options)
        output_dir = Path(output_dir) if output_dir is not None else workdir / "merged"
        report = execute_plan(plan, output_dir, overwrite=overwrite, progress=progress)
        verification = (verify_merge(plan, output_dir, functional=functional, device=request.device, progress=progress)
                        if verify else None)
    except BaseException:
        inputs.release()
        raise
    result = MergeResult(inputs=inputs, workdir=workdir, output_dir=output_dir, report=report,
                         verification=verification)
    result.write_card()
    return result


@dataclass
class ModelChecks:
    checks: list[Check]
    sample: Optional[SampleGeneration]


def model_checks(base_dir: Path, adapter_dir: Path, output_dir: Path, settings: Optional[GenerationSettings], *,
                 device: str = "auto", functional: str = "auto") -> ModelChecks:
    """Forward passes (logits vs PeftModel) and sample generations, loading both models once."""
    # The merged folder's own dtype decides the thresholds (16-bit weights round visibly).
    merged_config = read_json(Path(output_dir) / "config.json", "the merged model's config")
    dtype = str(merged_config.get("dtype") or merged_config.get("torch_dtype") or "auto")
    options = MergeOptions(dtype=dtype if dtype in ("float16", "bfloat16", "float32") else "auto")
    plan = build_plan(base_dir, adapter_dir, options, check_finite=False)
    fits, _reason = functional_budget(plan, "cuda" if device in ("auto", "cuda") else device)
    if functional == "never" and settings is None:
        return ModelChecks([], None)
    if not fits and functional != "always":
        skipped = functional_checks(plan, output_dir, memory_budget=0) if functional != "never" else []
        return ModelChecks(skipped, None)
    models = load_models(plan, output_dir, device=device)
    try:
        checks = functional_checks(plan, output_dir, models=models) if functional != "never" else []
        sample = None
        if settings is not None and settings.prompt.strip() and models.tokenizer is not None:
            sample = generate_samples(models, settings)
        return ModelChecks(checks, sample)
    finally:
        models.release()


def add_model_checks(result: MergeResult, checks: ModelChecks) -> None:
    if result.verification is None:
        result.verification = VerificationReport()
    result.verification.checks = [c for c in result.verification.checks if c.group != "function"] + checks.checks
    result.sample = checks.sample
    result.write_card()


def whoami_name(token: str, endpoint: Optional[str] = None) -> str:
    return str(HubClient(token, endpoint).whoami().get("name", ""))


def preflight_push(repo_id: str, *, token: Optional[str], mode: PushMode | str = PushMode.NEW, private: bool = False,
                   endpoint: Optional[str] = None) -> PushTarget:
    """Refuse a push that must fail (no or read-only token, foreign namespace, target taken or
    missing) before any merge work; see HubClient.preflight_push."""
    return HubClient(token, endpoint).preflight_push(repo_id, mode, private=private)


def push_merged(result: MergeResult, repo_id: str, *, token: str, private: bool = False,
                mode: PushMode | str = PushMode.NEW, endpoint: Optional[str] = None,
                progress: ProgressCallback = no_progress) -> PushResult:
    """Preflight the target, then upload the merged folder (with its card) in ONE commit."""
    client = HubClient(token, endpoint)
    target = client.preflight_push(repo_id, mode, private=private)
    result.write_card(target.repo_id)
    total = result.report.output_bytes
    progress(ProgressUpdate("upload", 0, total, "B", target.repo_id))
    pushed = client.push_folder(
        target, result.output_dir, message=f"Merge {result.inputs.adapter_id} into {result.inputs.base.name}",
        description="Merged with LoRA Merge Space (merge_core): one commit with weights, config, tokenizer and card.",
    )
    progress(ProgressUpdate("upload", total, total, "B", target.repo_id))
    return pushed


def cleanup(result: Optional[MergeResult]) -> None:
    """Remove a result's folders (None: nothing to do)."""
    if result is not None:
        result.release()


__all__ = [
    "LIMITS", "Limits", "SessionBusyError", "check_limits", "progress_adapter", "sample_note", "session_slot",
    "sizes_markdown", "verdict_markdown",
    "COMBINATION_TYPES", "Check", "InvalidOptionError", "MergeError", "MergeRequest", "MergeResult", "ModelChecks",
    "ProgressCallback", "ProgressUpdate", "PushError", "PushMode", "PushResult", "PushTarget", "ResolvedInputs",
    "UnsafeOutputError", "VerificationReport", "GenerationSettings", "add_model_checks", "cleanup",
    "explain_os_error", "model_checks", "new_workdir", "parse_adapter_list", "preflight_push", "push_merged",
    "resolve_inputs", "run_merge", "sweep_workdirs", "whoami_name",
]
