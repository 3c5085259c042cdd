"""One merge job end to end, shared by the app and the CLI: resolve, preflight, download,
merge, verify, card; then, separately, model checks (GPU-worthy) and the push.

This module orchestrates only: Hub IO and push rules live in ``hub``, the plan in ``plan``,
the writing in ``merge``. It is also the one import of the app, so it re-exports the names
a front end needs (see ``__all__``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from .card import build_model_card, speed_markdown
from .checkpoint import read_json
from .combine import COMBINATION_TYPES
from .errors import InvalidOptionError, MergeError, ModelLoadError, PushError, UnsafeOutputError, explain_os_error
from .folder_push import push_folder_with_progress
from .frontend import (
    DTYPES,
    FUNCTIONAL,
    GGUF_INFO,
    KEEP,
    LIMITS,
    PUSH_MODE_LABELS,
    QUANT_INFO,
    Limits,
    LocalPaths,
    MergeForm,
    MergeView,
    Prefill,
    PushForm,
    PushView,
    SessionBusyError,
    check_limits,
    field_names,
    form_from,
    merge_request,
    prefill,
    progress_adapter,
    sample_note,
    session_slot,
    sizes_markdown,
    verdict_markdown,
    view_updates,
)
from .generate import GenerationSettings, SampleGeneration, generate_samples, load_models, pick_device
from .gguf_export import GGUF_TYPES
from .gguf_outputs import rename_for_repo, write_gguf_files
from .hub import HubClient, PushMode, PushResult, PushTarget
from .inputs import MergeRequest, ResolvedInputs, parse_adapter_list, resolve_inputs
from .locks import Claim
from .merge import execute_plan
from .models import GENERATIVE_TASKS
from .outputs import missing_folders, remove_if_empty
from .plan import MergeOptions, build_plan
from .progress import ProgressCallback, ProgressUpdate, in_caller_context, no_progress
from .quant_targets import (
    COST_ROW,
    QUANT_TARGETS,
    QuantSummary,
    finish_target,
    refuse_quantized_original,
    requantize_settings,
)
from .report import MergeReport
from .speed import SpeedComparison, measure
from .stream_push import StreamPushResult, stream_merge_push
from .verify import Check, VerificationReport, functional_budget, functional_checks, verify_merge
from .verify_function import model_memory
from .workdirs import new_workdir, sweep_workdirs


@dataclass
class MergeResult:
    inputs: ResolvedInputs
    workdir: Path
    output_dir: Path
    report: MergeReport
    verification: VerificationReport | None
    sample: SampleGeneration | None = None
    workdir_claim: Claim | None = field(default=None, repr=False)  # the app's per-request folder
    gguf_files: dict[str, Path] = field(default_factory=dict)  # GGUF type -> file in output_dir
    quant: QuantSummary | None = None  # a quantized base: what it became and what that cost
    speed: SpeedComparison | None = None  # merged vs base + adapter, measured (the app's sample settings)
    sample_skipped: str = ""  # no sample because the models do not fit in memory: the sizes, in one sentence

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

    def write_card(self, repo_id: str | None = None) -> None:
        base = self.inputs.base
        card = build_model_card(
            self.report,
            self.verification,
            repo_id=repo_id,
            base_id=base.name,
            base_revision=base.revision,
            adapter_id=self.inputs.adapter_id,
            adapter_revision=self.inputs.adapter_revision,
            base_card=base.card,
            gguf_types=list(self.gguf_files),
            quant=self.quant,
            speed=self.speed,
        )
        # A path of undecodable bytes (surrogate escapes) cannot be written as UTF-8; shown as U+FFFD instead.
        text = str(card).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        with open(self.output_dir / "README.md", "w", encoding="utf-8", newline="") as f:  # as ModelCard.save
            f.write(text)

    def release(self) -> None:
        """Remove what this merge left on disk: temporary inputs and, for the app, its folder."""
        self.inputs.release()
        if self.workdir_claim is not None:
            self.workdir_claim.release(remove_folder=True)
            self.workdir_claim = None


def run_merge(
    request: MergeRequest,
    workdir: Path,
    progress: ProgressCallback = no_progress,
    *,
    output_dir: Path | None = None,
    overwrite: bool = True,
    verify: bool = True,
    functional: str = "never",
) -> MergeResult:
    """Everything up to a verified merged folder with its model card: ``output_dir`` (default
    ``workdir``/merged). The forward-pass checks are off by default: the app runs them on the
    GPU through model_checks; the CLI asks for them here."""
    workdir = Path(workdir)
    created = missing_folders(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_merge(
            request, workdir, progress, output_dir=output_dir, overwrite=overwrite, verify=verify, functional=functional
        )
    except BaseException:
        remove_if_empty(created)  # the output's parents this run made: a refused run leaves none behind
        raise


def _run_merge(
    request: MergeRequest,
    workdir: Path,
    progress: ProgressCallback,
    *,
    output_dir: Path | None,
    overwrite: bool,
    verify: bool,
    functional: str,
) -> MergeResult:
    request = replace(request, measure_cost=verify, gguf_types=list(request.gguf_types))
    inputs = resolve_inputs(request, workdir, progress)
    published: Path | None = None
    try:
        plan = build_plan(inputs.base.folder, inputs.adapter_dir, inputs.options)
        settings = requantize_settings(plan, request.quantized_target)  # refused before any writing
        refuse_quantized_original(plan, inputs)
        output_dir = Path(output_dir) if output_dir is not None else workdir / "merged"
        report = execute_plan(plan, output_dir, overwrite=overwrite, progress=progress)
        published = output_dir
        report.notes += inputs.notes
        verification = (
            verify_merge(plan, output_dir, functional=functional, device=request.device, progress=progress)
            if verify
            else None
        )
        fits = functional_budget(plan, "cpu") if verify else (False, "")
        gguf = write_gguf_files(output_dir, request.gguf_types, verify=verify, fits=fits, progress=progress)
        quant = finish_target(plan, inputs, output_dir, target=request.quantized_target, settings=settings, fits=fits)
        if verification is not None:
            verification.checks += gguf.checks + quant.checks
        report.notes += quant.notes
        result = MergeResult(
            inputs=inputs,
            workdir=workdir,
            output_dir=output_dir,
            report=report,
            verification=verification,
            gguf_files=gguf.files,
            quant=quant if quant.quantized_base else None,
        )
        result.write_card()
    except BaseException:
        inputs.release()
        if published is not None:  # published, then a later step failed (checks, GGUF, card): a failed run keeps none
            shutil.rmtree(published, ignore_errors=True)
        raise
    return result


@dataclass
class ModelChecks:
    checks: list[Check]
    sample: SampleGeneration | None
    sample_skipped: str = ""  # why there is no sample when the models do not fit in memory (one sentence)


def model_checks(
    base_dir: Path,
    adapter_dir: Path,
    output_dir: Path,
    settings: GenerationSettings | None,
    *,
    device: str = "auto",
    functional: str = "auto",
    memory_budget: int | None = None,
) -> ModelChecks:
    """Forward passes (logits vs PeftModel) and sample generations, loading both models once: straight onto
    the GPU when there is one. Models that do not fit the device's free memory (``memory_budget`` stands for
    it; default measured) are not loaded: the rows are streamed or skipped and ``sample_skipped`` says why."""
    # The merged folder's own dtype decides the thresholds (16-bit weights round visibly).
    merged_config = read_json(Path(output_dir) / "config.json", "the merged model's config")
    dtype = str(merged_config.get("dtype") or merged_config.get("torch_dtype") or "auto")
    options = MergeOptions(dtype=dtype if dtype in ("float16", "bfloat16", "float32") else "auto")
    plan = build_plan(base_dir, adapter_dir, options, check_finite=False)
    fit = model_memory(plan, pick_device(device).type, memory_budget)
    if functional == "never" and settings is None:
        return ModelChecks([], None)
    if not fit.fits and functional != "always":
        skipped = functional_checks(plan, output_dir, memory_budget=fit.free) if functional != "never" else []
        return ModelChecks(skipped, None, sample_skipped=fit.sentence() if settings is not None else "")
    try:
        models = load_models(plan, output_dir, device=device)
    except ModelLoadError:  # the rows say why, in one sentence each
        rows = functional_checks(plan, output_dir, device=device, force=True) if functional != "never" else []
        return ModelChecks(rows, None)
    try:
        checks = functional_checks(plan, output_dir, models=models) if functional != "never" else []
        sample = None
        wants_text = settings is not None and settings.prompt.strip() and models.tokenizer is not None
        if wants_text and models.task in GENERATIVE_TASKS:
            sample = generate_samples(models, settings)
        return ModelChecks(checks, sample)
    finally:
        models.release()


def add_model_checks(result: MergeResult, checks: ModelChecks) -> None:
    if result.verification is None:
        result.verification = VerificationReport()
    # The model checks replace the forward-pass rows, not the GGUF rows or the quantized-base cost.
    kept = [c for c in result.verification.checks if c.group != "function" or _own_row(c)]
    result.verification.checks = kept + checks.checks
    result.sample = checks.sample
    result.sample_skipped = checks.sample_skipped
    result.write_card()


def _own_row(check: Check) -> bool:
    return check.name == COST_ROW or check.name.startswith("gguf ")


def whoami_name(token: str, endpoint: str | None = None) -> str:
    return str(HubClient(token, endpoint).whoami().get("name", ""))


def preflight_push(
    repo_id: str,
    *,
    token: str | None,
    mode: PushMode | str = PushMode.NEW,
    private: bool = False,
    endpoint: str | None = None,
) -> PushTarget:
    """Refuse a push that must fail (no or read-only token, foreign namespace, target taken or
    missing) before any merge work; see HubClient.preflight_push."""
    return HubClient(token, endpoint).preflight_push(repo_id, mode, private=private)


def push_merged(
    result: MergeResult,
    repo_id: str,
    *,
    token: str,
    private: bool = False,
    mode: PushMode | str = PushMode.NEW,
    endpoint: str | None = None,
    progress: ProgressCallback = no_progress,
    oauth_scope: str | None = None,
) -> PushResult:
    """Preflight the target, then upload the merged folder (with its card) in ONE commit, reporting
    the bytes sent as they go (merge_core.folder_push). ``oauth_scope``: a Space login's scopes
    (merge_core.permissions)."""
    client = HubClient(token, endpoint, oauth_scope=oauth_scope)
    target = client.preflight_push(repo_id, mode, private=private)
    # llama-cli -hf OWNER/REPO:TYPE looks for <repo-name>-<TYPE>.gguf
    result.gguf_files = rename_for_repo(result.gguf_files, target.repo_id.split("/")[-1])
    result.write_card(target.repo_id)
    return push_folder_with_progress(
        client,
        target,
        result.output_dir,
        message=f"Merge {result.inputs.adapter_id} into {result.inputs.base.name}",
        description="Merged with LoRA Merge Space (merge_core): one commit with weights, config, tokenizer and card.",
        progress=progress,
    )


def cleanup(result: MergeResult | None) -> None:
    """Remove a result's folders (None: nothing to do)."""
    if result is not None:
        result.release()


# Last: jobs uses this module's names at call time.
from .jobs import (  # noqa: E402
    ChecksRunner,
    failure_message,
    push_markdown,
    push_mode_of,
    run_job,
    scrub,
    suggest_repo_id,
)
from .stream_app import (  # noqa: E402 - the app's streamed mode (it calls stream_push below)
    STREAM_BUTTON,
    STREAM_INFO,
    StreamedMerge,
    StreamForm,
    disk_hint,
    stream_progress,
    stream_to_hub,
)

__all__ = [
    "in_caller_context",
    "STREAM_BUTTON",
    "STREAM_INFO",
    "StreamForm",
    "StreamedMerge",
    "disk_hint",
    "stream_progress",
    "stream_push",
    "stream_to_hub",
    "Prefill",
    "SpeedComparison",
    "measure",
    "prefill",
    "speed_markdown",
    "PUSH_MODE_LABELS",
    "push_mode_of",
    "ChecksRunner",
    "failure_message",
    "push_markdown",
    "run_job",
    "scrub",
    "suggest_repo_id",
    "DTYPES",
    "FUNCTIONAL",
    "GGUF_INFO",
    "GGUF_TYPES",
    "QUANT_INFO",
    "QUANT_TARGETS",
    "KEEP",
    "MergeForm",
    "MergeView",
    "PushView",
    "view_updates",
    "PushForm",
    "field_names",
    "form_from",
    "merge_request",
    "LIMITS",
    "Limits",
    "LocalPaths",
    "SessionBusyError",
    "check_limits",
    "progress_adapter",
    "sample_note",
    "session_slot",
    "sizes_markdown",
    "verdict_markdown",
    "COMBINATION_TYPES",
    "Check",
    "InvalidOptionError",
    "MergeError",
    "MergeRequest",
    "MergeResult",
    "ModelChecks",
    "ProgressCallback",
    "ProgressUpdate",
    "PushError",
    "PushMode",
    "PushResult",
    "PushTarget",
    "ResolvedInputs",
    "UnsafeOutputError",
    "VerificationReport",
    "GenerationSettings",
    "add_model_checks",
    "cleanup",
    "explain_os_error",
    "model_checks",
    "new_workdir",
    "parse_adapter_list",
    "preflight_push",
    "push_merged",
    "resolve_inputs",
    "run_merge",
    "sweep_workdirs",
    "whoami_name",
]


def stream_push(
    request: MergeRequest,
    repo_id: str,
    *,
    mode: PushMode | str = PushMode.NEW,
    private: bool = False,
    max_disk: int | None = None,
    progress: ProgressCallback = no_progress,
    verify: bool = False,
    oauth_scope: str | None = None,
) -> StreamPushResult:
    """Hub to Hub with no local copy: base shards fetched just in time, each output shard uploaded as soon
    as it is written, one commit at the end (merge_core.stream_push). The target is checked first."""
    from .workdirs import new_workdir

    client = HubClient(request.token, request.endpoint, oauth_scope=oauth_scope)
    target = client.preflight_push(repo_id, mode, private=private)
    workdir = new_workdir()
    try:
        return stream_merge_push(request, target, workdir.folder, max_disk=max_disk, progress=progress, verify=verify)
    finally:
        workdir.release(remove_folder=True)
