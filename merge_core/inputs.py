"""From what the user typed to local folders: Hub IDs resolved and pinned, adapters downloaded
(and combined when there are several), the declared-base rules applied, and the merge plan
validated from the safetensors headers before any base shard is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .adapter import load_adapter_config
from .card import read_local_card_data
from .checkpoint import read_json
from .errors import GgufUnsupportedError, InvalidOptionError
from .gguf_outputs import preflight_folder
from .hub import (
    BASE_SMALL_PATTERNS,
    HubClient,
    RepoRef,
    adapter_files,
    matching,
    parse_source,
)
from .hub_base import hub_base_files
from .locks import Claim
from .merge import check_disk
from .plan import MergeOptions, build_plan, parse_size
from .progress import ProgressCallback, ProgressUpdate, no_progress
from .workdirs import new_combined_folder, sweep_combined


@dataclass
class MergeRequest:
    adapter: str
    base: str = ""
    adapter_revision: str | None = None
    base_revision: str | None = None
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    compute_dtype: str = "float64"
    device: str = "cpu"
    token: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    functional: str = "auto"
    # Several adapters: `adapter` lists them, one per line or comma-separated, each
    # optionally with ":weight"; they are combined into one adapter first (merge_core.combine).
    combination: str = "stack"
    density: float | None = None
    svd_rank: int | None = None
    seed: int = 0
    # Server-side safety for a public app: local folders are read only under these roots
    # (None: any folder, as the CLI wants). Hub downloads go to cache_dir when given, so a
    # per-request folder frees them again (default: the shared huggingface_hub cache).
    local_roots: list[Path] | None = None
    cache_dir: Path | None = None
    # GGUF files to write beside the merged model (merge_core.gguf_outputs), refused before any download.
    gguf_types: list[str] = field(default_factory=list)
    gguf_optional: bool = False  # the app: an architecture without GGUF support gets a note, not a refusal
    # What a quantized base becomes (merge_core.quant_targets); original_base overrides the card's base_model.
    quantized_target: str = "dequantized"
    original_base: str = ""
    measure_cost: bool = True  # target original: also download the quantized weights, to measure the cost

    def __repr__(self) -> str:  # dataclass repr=False on token is not enough if someone formats vars()
        return f"MergeRequest(adapter={self.adapter!r}, base={self.base!r}, dtype={self.dtype!r})"

    def options(self, **names: Any) -> MergeOptions:
        """The merge options, validated (InvalidOptionError names the bad value)."""
        from .quant_targets import check_target

        self.quantized_target = check_target(self.quantized_target)
        if self.gguf_types and self.quantized_target == "requantized":
            raise InvalidOptionError(
                "GGUF files are written from a plain model, not a bitsandbytes one; drop --gguf or choose the "
                "dequantized target."
            )
        return MergeOptions(
            dtype=self.dtype,
            max_shard_size=parse_size(self.max_shard_size),
            compute_dtype=self.compute_dtype,
            device=self.device,
            **names,
        )

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
    revision: str | None  # the pinned commit for a Hub adapter
    weight: float = 1.0


@dataclass
class BaseInput:
    folder: Path
    name: str
    revision: str | None
    card: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResolvedInputs:
    """Local folders for base and adapter, validated against each other (preflight done)."""

    base: BaseInput
    adapter_dir: Path  # the one adapter, or the combination of several
    adapter_id: str
    adapter_revision: str | None
    options: MergeOptions
    suggested_name: str = "merged"
    temporary: list[Claim] = field(default_factory=list)  # e.g. a combined adapter; released when done
    # target "original": the quantized base the user named (what was trained), merged into its original instead
    quantized_base: BaseInput | None = None
    notes: list[str] = field(default_factory=list)

    def release(self) -> None:
        for claimed in self.temporary:
            claimed.release(remove_folder=True)
        self.temporary.clear()


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


def _check_local(path: Path, roots: list[Path] | None, what: str) -> Path:
    if roots is None:
        return path
    resolved = path.resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        raise ValueError(
            f"{what} {str(path)!r} is a local folder, which is not allowed here; enter a Hub ID like owner/name."
        )
    return path


@dataclass
class HubSession:
    """The request's Hub client, made on first use (a local-only merge never needs one)."""

    request: MergeRequest

    @cached_property
    def client(self) -> HubClient:
        return HubClient(self.request.token, self.request.endpoint)


def _fetch_adapter(spec: str, weight: float, revision: str | None, hub: HubSession) -> AdapterInput:
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
        folder = combine_adapters(
            [AdapterSource(a.folder, a.weight, a.name) for a in adapters],
            request.combination,
            claimed.folder,
            density=request.density,
            svd_rank=request.svd_rank,
            seed=request.seed,
        )
    except BaseException:
        claimed.release(remove_folder=True)
        raise
    parts = " + ".join(f"{a.weight:g} x {a.name}" + (f"@{a.revision[:12]}" if a.revision else "") for a in adapters)
    return Path(folder), f"{request.combination}({parts})", claimed


def base_source(request: MergeRequest, adapter_dir: Path) -> tuple[RepoRef | Path, str]:
    """The base as typed, or the one the adapter declares, with the declared-base rules: a
    declared local folder is read only where local folders are allowed (never the server's
    own folders on a public app), and a trainer's path gets a message saying what to do."""
    typed = (request.base or "").strip()
    if typed:
        return parse_source(typed, request.base_revision), typed
    config = load_adapter_config(adapter_dir)
    declared = (config.base_model_name_or_path or "").strip()
    if not declared:
        raise ValueError("The adapter does not name its base model; enter the base model ID.")
    try:
        # The declared base at the commit the adapter records, as PEFT's AutoPeftModel loads it.
        source = parse_source(declared, request.base_revision or config.revision)
    except ValueError:
        # Adapters often record the trainer's own folder (e.g. a Colab path) as their base.
        raise ValueError(
            f"The adapter's config names {declared!r} as its base model, which is not a Hub ID that "
            "can be used here. Enter the base model's Hub ID."
        ) from None
    if isinstance(source, Path) and request.local_roots is not None:
        try:
            _check_local(source, request.local_roots, "The base model")
        except ValueError:
            raise ValueError(
                f"The adapter's config names a local folder as its base model ({declared!r}), which "
                "this app cannot read. Enter the base model's Hub ID in 'Base model'."
            ) from None
    return source, declared


def _fetch_hub_base(
    ref: RepoRef,
    adapter_dir: Path,
    options: MergeOptions,
    hub: HubSession,
    *,
    output_parent: Path,
    progress: ProgressCallback,
    notes: list[str],
) -> BaseInput:
    """Small files and safetensors headers first; the GGUF types and the plan are validated (and the
    disk checked) before any shard is downloaded."""
    client, cache = hub.client, hub.request.cache_dir
    meta = hub_base_files(ref, client, cache_dir=cache)
    _gguf_preflight(meta.folder, hub.request, notes)
    files, base_dir, checkpoint = meta.files, meta.folder, meta.checkpoint
    shards = sorted(meta.headers)
    shard_bytes = sum(files.get(s, 0) for s in shards)
    output_bytes = build_plan(checkpoint, adapter_dir, options).output_nbytes if checkpoint is not None else 0
    if _same_disk(base_dir, output_parent):
        # One disk holds both (the app's per-request folder): the download still to come and the merged copy
        # must fit together, or the merge would stop after the whole download. Shards in the cache cost nothing.
        to_fetch = sum(files.get(s, 0) for s in shards if not (base_dir / s).exists())
        check_disk(output_parent, to_fetch + output_bytes, f"{ref.repo_id} and the merged model together")
    else:
        check_disk(base_dir, shard_bytes, f"downloading {ref.repo_id}")
        if checkpoint is not None:
            check_disk(output_parent, output_bytes)
    base_dir = client.download(
        ref, meta.sha, meta.small + shards, cache_dir=cache, progress=progress, total_bytes=shard_bytes
    )
    return BaseInput(Path(base_dir), ref.repo_id, ref.revision, client.card_data(ref))


def _same_disk(a: Path, b: Path) -> bool:
    def device(path: Path) -> int:
        return next(p for p in (path, *path.parents) if p.exists()).stat().st_dev

    return device(Path(a)) == device(Path(b))


def _gguf_preflight(folder: Path, request: MergeRequest, notes: list[str]) -> None:
    """Refuse GGUF types the base's architecture cannot have; the app (gguf_optional) drops them with a note."""
    try:
        preflight_folder(folder, request.gguf_types)
    except GgufUnsupportedError as exc:
        if not request.gguf_optional:
            raise
        notes.append(f"No GGUF file was made: {exc}")
        request.gguf_types = []


def _local_base(path: Path, text: str, request: MergeRequest) -> BaseInput:
    folder = _check_local(path, request.local_roots, "The base model")
    return BaseInput(Path(folder), text, None, read_local_card_data(folder))


def _original_source(
    source: RepoRef | Path, text: str, inputs: ResolvedInputs, hub: HubSession
) -> tuple[RepoRef | Path, str]:
    """Target "original": the quantized base's small files and card name the full-precision model it was
    made from (or the user does); that model becomes the base, the quantized one is kept to measure the cost."""
    from .quant_targets import find_original_base

    request = hub.request
    if isinstance(source, RepoRef):
        sha, files = hub.client.resolve(source)
        wanted = matching(files, BASE_SMALL_PATTERNS)
        if request.measure_cost:
            wanted += sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        folder = Path(hub.client.download(source, sha, wanted, cache_dir=request.cache_dir))
        card, name = hub.client.card_data(source), source.repo_id
    else:
        folder = _check_local(source, request.local_roots, "The base model")
        card, name = read_local_card_data(folder), text
    config = read_json(folder / "config.json", "the base model's config")
    if "quantization_config" not in config:
        raise InvalidOptionError(
            f"The base {name} is not quantized, so it has no original to merge into; use the default target."
        )
    original = (request.original_base or "").strip() or find_original_base(card, config, name)
    if not original:
        raise InvalidOptionError(
            f"Cannot tell which full-precision model {name} was made from (its model card names no base_model); "
            "give it with --original-base OWNER/NAME."
        )
    inputs.quantized_base = BaseInput(folder, name, getattr(source, "revision", None), card)
    inputs.notes.append(
        f"Merged into {original}, the full-precision model the quantized base {name} was made from "
        "(target: original); the adapter was trained on the quantized weights."
    )
    return parse_source(original, None), original


def resolve_adapter(request: MergeRequest, hub: HubSession, output_parent: Path) -> ResolvedInputs:
    """The request's adapters as one local adapter folder (combined when there are several)."""
    entries = parse_adapter_list(request.adapter)
    revision = request.adapter_revision if len(entries) == 1 else None
    adapters = [_fetch_adapter(spec, weight, revision, hub) for spec, weight in entries]
    if len(adapters) == 1 and adapters[0].weight == 1.0:
        one, temporary = adapters[0], []
    else:
        folder, adapter_id, claimed = _combine(adapters, request, output_parent)
        one, temporary = AdapterInput(folder, adapter_id, None), [claimed]
    return ResolvedInputs(
        base=BaseInput(Path(), "", None),
        adapter_dir=Path(one.folder),
        adapter_id=one.name,
        adapter_revision=one.revision,
        options=request.options(),
        suggested_name=_suggest_name(adapters[0].name),
        temporary=temporary,
    )


def resolve_inputs(
    request: MergeRequest, output_parent: Path, progress: ProgressCallback = no_progress
) -> ResolvedInputs:
    """Hub IDs or local folders -> local folders. For Hub IDs the small files come first and the
    merge plan is validated from the safetensors headers before any shard is downloaded."""
    request.options()  # a bad option is refused before anything is read or downloaded
    sweep_combined(output_parent)
    hub = HubSession(request)
    progress(ProgressUpdate("resolve", 0, 2, "", "adapter"))
    inputs = resolve_adapter(request, hub, output_parent)
    try:
        progress(ProgressUpdate("resolve", 1, 2, "", "base"))
        source, text = base_source(request, inputs.adapter_dir)
        inputs.options = request.options(
            base_name=str(source) if isinstance(source, RepoRef) else text,
            adapter_name=inputs.adapter_id,
            adapter_revision=inputs.adapter_revision,
        )
        if request.quantized_target == "original":
            source, text = _original_source(source, text, inputs, hub)
        if isinstance(source, RepoRef):
            inputs.base = _fetch_hub_base(
                source,
                inputs.adapter_dir,
                inputs.options,
                hub,
                output_parent=output_parent,
                progress=progress,
                notes=inputs.notes,
            )
        else:
            inputs.base = _local_base(source, text, request)
            _gguf_preflight(inputs.base.folder, request, inputs.notes)
    except BaseException:
        inputs.release()
        raise
    progress(ProgressUpdate("resolve", 2, 2, "", "done"))
    return inputs


__all__ = [
    "AdapterInput",
    "BaseInput",
    "MergeRequest",
    "ResolvedInputs",
    "parse_adapter_list",
    "resolve_inputs",
]
