"""One merge job end to end, shared by the app and the CLI: resolve, preflight, download,
merge, verify, card; then, separately, model checks (GPU-worthy) and the push."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .adapter import load_adapter_config
from .card import build_model_card, read_local_card_data
from .checkpoint import BaseCheckpoint, BaseTensor, read_json
from .errors import HubError, MergeError, PushError
from .generate import GenerationSettings, SampleGeneration, generate_samples, load_models
from .hub import BASE_SMALL_PATTERNS, HubClient, RepoRef, adapter_files, base_weight_files, matching, parse_source
from .merge import check_disk, execute_plan
from .plan import MergeOptions, build_plan, parse_size
from .progress import ProgressCallback, ProgressUpdate, no_progress
from .report import MergeReport
from .safetensors_io import TensorInfo
from .verify import Check, VerificationReport, functional_budget, functional_checks, verify_merge


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


@dataclass
class MergeResult:
    workdir: Path
    base_dir: Path
    adapter_dir: Path
    output_dir: Path
    report: MergeReport
    verification: Optional[VerificationReport]
    base_id: str
    base_revision: Optional[str]
    adapter_id: str
    adapter_revision: Optional[str]
    suggested_repo_name: str
    base_card: dict[str, Any] = field(default_factory=dict)
    sample: Optional[SampleGeneration] = None
    temporary: list[Path] = field(default_factory=list)  # e.g. a combined adapter outside workdir's "merged"

    def sizes(self) -> dict[str, float]:
        return {
            "adapter_mb": self.report.adapter_bytes / 1e6,
            "base_gb": self.report.base_bytes / 1e9,
            "merged_gb": self.report.output_bytes / 1e9,
        }

    def write_card(self, repo_id: Optional[str] = None) -> None:
        card = build_model_card(self.report, self.verification, repo_id=repo_id, base_id=self.base_id,
                                base_revision=self.base_revision, adapter_id=self.adapter_id,
                                adapter_revision=self.adapter_revision, base_card=self.base_card)
        card.save(self.output_dir / "README.md")


def _suggest_name(adapter_id: str) -> str:
    name = Path(adapter_id.rstrip("/")).name or "adapter"
    for suffix in ("-lora", "_lora", "-adapter", "_adapter", "-peft"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return f"{name}-merged"


def _preflight_checkpoint(base_dir: Path, headers: dict[str, dict[str, Any]], name: str) -> BaseCheckpoint:
    """A BaseCheckpoint from remote headers, so the plan validates before the shards download."""
    config = read_json(base_dir / "config.json", "the base model's config")
    tensors: dict[str, BaseTensor] = {}
    for shard, entries in sorted(headers.items()):
        for tensor, (dtype, shape, offsets) in entries.items():
            tensors[tensor] = BaseTensor(base_dir / shard, TensorInfo(tensor, dtype, tuple(shape), offsets[0], offsets[1]))
    return BaseCheckpoint(path=base_dir, config=config, tensors=tensors, shards=[base_dir / s for s in sorted(headers)], name=name)


@dataclass
class ResolvedInputs:
    """Local folders for base and adapter, validated against each other (preflight done)."""

    base_dir: Path
    adapter_dir: Path
    options: MergeOptions
    base_id: str
    base_revision: Optional[str]
    adapter_id: str
    adapter_revision: Optional[str]
    base_card: dict[str, Any]
    suggested_name: str = "merged"
    temporary: list[Path] = field(default_factory=list)  # e.g. a combined adapter; remove when done


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
        raise ValueError(f"{what} {str(path)!r} is a local folder, which is not allowed here; enter a Hub ID like owner/name.")
    return path


def resolve_inputs(request: MergeRequest, output_parent: Path, progress: ProgressCallback = no_progress) -> ResolvedInputs:
    """Hub IDs or local folders -> local folders. For Hub IDs the small files come first and the
    merge plan is validated from the safetensors headers before any shard is downloaded."""
    client: Optional[HubClient] = None

    def hub() -> HubClient:
        nonlocal client
        if client is None:
            client = HubClient(request.token, request.endpoint)
        return client

    progress(ProgressUpdate("resolve", 0, 2, "", "adapter"))
    entries = parse_adapter_list(request.adapter)
    temporary: list[Path] = []
    resolved: list[tuple[Path, str, Optional[str], float]] = []
    for spec, weight in entries:
        adapter_src = parse_source(spec, request.adapter_revision if len(entries) == 1 else None)
        if isinstance(adapter_src, RepoRef):
            sha, files = hub().resolve(adapter_src)
            one_dir = hub().download(adapter_src, sha, adapter_files(files, adapter_src),
                                     cache_dir=request.cache_dir) / adapter_src.subfolder
            one_id = adapter_src.repo_id + (f"/{adapter_src.subfolder}" if adapter_src.subfolder else "")
            resolved.append((one_dir, one_id, adapter_src.revision or sha[:12], weight))
        else:
            resolved.append((_check_local(adapter_src, request.local_roots, "The adapter"), spec, None, weight))
    if len(resolved) == 1 and resolved[0][3] == 1.0:
        adapter_dir, adapter_id, adapter_rev, _ = resolved[0]
    else:
        from .combine import AdapterSource, combine_adapters

        combined = Path(output_parent) / f".combined-adapter-{uuid.uuid4().hex[:8]}"
        adapter_dir = combine_adapters(
            [AdapterSource(path, weight, name) for path, name, _, weight in resolved], request.combination, combined,
            density=request.density, svd_rank=request.svd_rank, seed=request.seed,
        )
        adapter_id = " + ".join(f"{w:g} x {name}" + (f"@{rev}" if rev else "") for _, name, rev, w in resolved)
        adapter_id = f"{request.combination}({adapter_id})"
        adapter_rev = None
        temporary.append(combined)
    adapter_config = load_adapter_config(adapter_dir)

    declared = not (request.base or "").strip()
    base_text = (request.base or "").strip() or (adapter_config.base_model_name_or_path or "")
    if not base_text:
        raise ValueError("The adapter does not name its base model; enter the base model ID.")
    progress(ProgressUpdate("resolve", 1, 2, "", "base"))
    try:
        base_src = parse_source(base_text, request.base_revision)
        if declared and isinstance(base_src, Path):
            _check_local(base_src, request.local_roots, "The base model")
    except ValueError:
        if not declared:
            raise
        # Adapters often record the trainer's own folder (e.g. a Colab path) as their base.
        raise ValueError(
            f"The adapter's config names {base_text!r} as its base model, which is not a Hub ID that can be used "
            "here. Enter the base model's Hub ID."
        ) from None
    options = MergeOptions(dtype=request.dtype, max_shard_size=parse_size(request.max_shard_size),
                           compute_dtype=request.compute_dtype, device=request.device,
                           base_name=str(base_src) if isinstance(base_src, RepoRef) else base_text,
                           adapter_name=adapter_id, adapter_revision=adapter_rev)
    if isinstance(base_src, RepoRef):
        sha, files = hub().resolve(base_src)
        base_weight_files(files, base_src)  # refuses pickle-only repos before any download
        small = matching(files, BASE_SMALL_PATTERNS)
        base_dir = hub().download(base_src, sha, small, cache_dir=request.cache_dir)
        headers = hub().safetensors_headers(base_src, sha)
        preflight = build_plan(_preflight_checkpoint(base_dir, headers, str(base_src)), adapter_dir, options)
        shards = sorted(headers)
        shard_bytes = sum(files.get(s, 0) for s in shards)
        check_disk(base_dir, shard_bytes, f"downloading {base_src.repo_id}")
        check_disk(output_parent, preflight.output_nbytes)
        base_dir = hub().download(base_src, sha, small + shards,
                                  cache_dir=request.cache_dir, progress=progress, total_bytes=shard_bytes)
        base_id, base_rev = base_src.repo_id, base_src.revision
        base_card = hub().card_data(base_src)
    else:
        base_dir, base_id, base_rev = _check_local(base_src, request.local_roots, "The base model"), base_text, None
        base_card = read_local_card_data(base_dir)
    progress(ProgressUpdate("resolve", 2, 2, "", "done"))
    return ResolvedInputs(Path(base_dir), Path(adapter_dir), options, base_id, base_rev, adapter_id, adapter_rev, base_card,
                          suggested_name=_suggest_name(resolved[0][1]), temporary=temporary)


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
        plan = build_plan(inputs.base_dir, inputs.adapter_dir, inputs.options)
        output_dir = Path(output_dir) if output_dir is not None else workdir / "merged"
        report = execute_plan(plan, output_dir, overwrite=overwrite, progress=progress)
        verification = (verify_merge(plan, output_dir, functional=functional, device=request.device, progress=progress)
                        if verify else None)
    except BaseException:
        for path in inputs.temporary:
            shutil.rmtree(path, ignore_errors=True)
        raise
    result = MergeResult(workdir=workdir, base_dir=inputs.base_dir, adapter_dir=inputs.adapter_dir,
                         output_dir=output_dir, report=report, verification=verification, base_id=inputs.base_id,
                         base_revision=inputs.base_revision, adapter_id=inputs.adapter_id,
                         adapter_revision=inputs.adapter_revision,
                         suggested_repo_name=inputs.suggested_name, base_card=inputs.base_card,
                         temporary=inputs.temporary)
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
    plan = build_plan(base_dir, adapter_dir, MergeOptions(dtype=dtype if dtype in ("float16", "bfloat16", "float32") else "auto"),
                      check_finite=False)
    fits, reason = functional_budget(plan, "cuda" if device in ("auto", "cuda") else device)
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


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit_oid: str
    commit_url: str
    pr_url: Optional[str]


PUSH_MODES = ("new", "update", "pr")


def whoami_name(token: str, endpoint: Optional[str] = None) -> str:
    return str(HubClient(token, endpoint).whoami().get("name", ""))


def push_merged(result: MergeResult, repo_id: str, *, token: str, private: bool = False, mode: str = "new",
                endpoint: Optional[str] = None, progress: ProgressCallback = no_progress) -> PushResult:
    """Create (or reuse) the repo and upload the merged folder in ONE commit."""
    if mode not in PUSH_MODES:
        raise ValueError(f"Unknown push mode {mode!r}; choose one of {', '.join(PUSH_MODES)}.")
    client = HubClient(token, endpoint)
    me = client.whoami()
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError("Your token is read-only. Create a token with write access (Settings → Access Tokens) or log in again.")
    repo_id = repo_id.strip()
    if "/" not in repo_id:
        repo_id = f"{me.get('name')}/{repo_id}"
    ref = RepoRef(repo_id)
    api = client.api
    exists = client._call(ref, lambda: api.repo_exists(repo_id))
    created = False
    if mode == "new":
        if exists:
            raise PushError(f"{repo_id} already exists. Choose another name, or 'Update existing repo' / 'Open a pull request'.")
        try:
            client._call(ref, lambda: api.create_repo(repo_id, private=private, exist_ok=False))
        except HubError as exc:
            raise PushError(f"Could not create {repo_id}: {exc}. Your token needs write access to the namespace "
                            f"{repo_id.split('/')[0]!r}.") from exc
        created = True
    elif not exists:
        raise PushError(f"{repo_id} does not exist (or your account cannot see it); choose 'Create new repo'.")

    result.write_card(repo_id)
    progress(ProgressUpdate("upload", 0, result.report.output_bytes, "B", repo_id))
    message = f"Merge {result.adapter_id} into {result.base_id}"
    try:
        info = client._call(ref, lambda: api.upload_folder(
            repo_id=repo_id, folder_path=result.output_dir, commit_message=message,
            commit_description="Merged with LoRA Merge Space (merge_core): one commit with weights, config, tokenizer and card.",
            create_pr=mode == "pr",
            # An update replaces the weights whole: stale shards of an older merge must not survive.
            delete_patterns=["*.safetensors", "model.safetensors.index.json"] if mode == "update" else None,
        ))
    except Exception as exc:  # noqa: BLE001 - any upload failure: say that nothing landed
        hint = (f" The repository {repo_id} was created but nothing was committed; push again with 'Update existing repo'."
                if created else f" Nothing was committed; {repo_id} is unchanged.")
        detail = str(exc) if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
        raise PushError(f"Upload failed ({detail}).{hint}") from exc
    progress(ProgressUpdate("upload", result.report.output_bytes, result.report.output_bytes, "B", repo_id))
    if mode == "pr" and not getattr(info, "pr_url", None):
        # huggingface_hub skips files the repo already has; with nothing left it opens no PR.
        raise PushError(f"{repo_id} already holds exactly these files, so there is nothing to propose; no pull request was opened.")
    url = f"{client.endpoint}/{repo_id}"
    return PushResult(repo_id, url, str(info.oid), str(info.commit_url), getattr(info, "pr_url", None))


def cleanup(workdir: Optional[Path]) -> None:
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["MergeRequest", "MergeResult", "ModelChecks", "PushResult", "add_model_checks", "cleanup", "model_checks",
           "push_merged", "run_merge", "whoami_name", "GenerationSettings"]
