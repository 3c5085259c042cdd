"""Function rows of causal LMs computed layer by layer, for models that do not fit in memory.

Both models are built without weights (accelerate's ``init_empty_weights``, transformers' own class
from config.json) and PEFT injects the adapter into the base skeleton as ``PeftModel.from_pretrained``
does. A forward pre-hook on each decoder layer (and on each module with weights outside the layers:
embeddings, final norm, head) reads that module's tensors from the safetensors files just before it
runs; a forward hook puts them back on the meta device right after. The model's own forward then runs
unchanged (rotary embeddings, masks, PEFT's unmerged LoRA math), holding one layer's weights at a time.

LayerRuns holds the three forwards (base + adapter, merged, base) over the probe inputs and advances each
as far as the files on disk allow: a unit whose tensors are not there yet pauses the forward, and the next
advance replays the units already run from their kept outputs (hidden states) instead of recomputing them.
A whole folder runs in one advance; a streamed push (stream_function) advances it as each shard lands.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import BaseTensor, load_base_checkpoint
from .errors import ModelLoadError
from .models import LoadedModels, MergedModelLoadError, choose_model_class, short_error, token_vocab
from .plan import MergePlan
from .safetensors_io import DTYPE_FROM_ST, OpenFiles, TensorInfo, read_rows
from .skeletons import (
    LayerStreamError,
    buffers_to,
    by_name,
    by_object,
    checkpoint_tensors,
    meta_params,
    skeleton,
    units,
    with_adapter,
)
from .tasks import LOGIT_ROWS, Compared, probe_inputs
from .verify_report import Check

STREAMED_TASKS = ("CAUSAL_LM",)


@dataclass
class StreamStats:
    """What the hooks materialised: the proof that one unit (about one layer) is held at a time."""

    units: int = 0  # hooked modules per model
    loads: int = 0  # unit loads over all forward passes
    held: int = 0  # elements materialised right now
    peak: int = 0  # most elements materialised at once
    largest_unit: int = 0  # elements of the largest unit


class _Paused(Exception):
    """A unit's tensors are not on disk yet: the forward stops before it, to resume from there."""

    def __init__(self, unit: int) -> None:
        super().__init__(unit)
        self.unit = unit


@dataclass
class _Source:
    """Where each parameter of one skeleton comes from: {parameter name: checkpoint tensor}."""

    tensors: dict[str, BaseTensor]  # by parameter name in the model
    which: str  # "base" or "merged", for messages
    device: torch.device
    files: OpenFiles = field(default_factory=OpenFiles)
    # A streamed push: where each checkpoint tensor is now (shards are located as they arrive) and which
    # files are on disk; None for a whole folder, where every file is there from the start.
    live: Mapping[str, BaseTensor] | None = None
    present: set[Path] | None = None
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # copied to RAM before their file went

    def where(self, name: str) -> BaseTensor | None:
        tensor = self.tensors.get(name)
        if tensor is None or self.live is None:
            return tensor
        return self.live.get(tensor.info.name, tensor)

    def ready(self, name: str) -> bool:
        tensor = self.where(name)
        if tensor is None or self.present is None:
            return True  # a missing tensor is load's error to raise
        return tensor.info.name in self.kept or Path(tensor.shard) in self.present

    def read(self, tensor: BaseTensor) -> torch.Tensor:
        # Plain reads, not a memory map: mapped pages of a 26 GB checkpoint would count as held memory.
        info = tensor.info
        return read_rows(self.files.get(tensor.shard), info, 0, info.shape[0] if info.shape else 1)

    def load(self, name: str, like: torch.Tensor) -> torch.Tensor:
        tensor = self.where(name)
        if tensor is None:
            raise self._error(f"the {self.which} checkpoint has no tensor for {name}")
        value = self.kept.get(tensor.info.name)
        value = (self.read(tensor) if value is None else value).to(self.device, like.dtype)
        if tuple(value.shape) != tuple(like.shape):
            raise self._error(
                f"the {self.which} checkpoint's {tensor.info.name} has shape {list(value.shape)}, "
                f"the model expects {list(like.shape)}"
            )
        return value

    def _error(self, text: str) -> ModelLoadError:
        return (MergedModelLoadError if self.which == "merged" else LayerStreamError)(text[:1].upper() + text[1:] + ".")


_Params = list[tuple[str, torch.nn.Module, str, torch.nn.Parameter]]


class _Streamer:
    """Hooks that materialise one unit of a skeleton before it runs and free it after; within a _Pass they
    pause at a unit whose tensors are not on disk and keep each finished unit's output."""

    def __init__(self, model: torch.nn.Module, source: _Source, stats: StreamStats):
        self.source, self.stats = source, stats
        self.handles: list[Any] = []
        self.run: _Pass | None = None
        self.loaded: set[int] = set()
        module_names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        self.units = units(model)
        self.params = [meta_params(unit, module_names) for unit in self.units]
        stats.units = len(self.units)
        for k, unit in enumerate(self.units):
            stats.largest_unit = max(stats.largest_unit, sum(p.numel() for _, _, _, p in self.params[k]))
            self.handles.append(unit.register_forward_pre_hook(self._loader(k)))
            self.handles.append(unit.register_forward_hook(self._freer(k)))

    def _loader(self, k: int) -> Any:
        params = self.params[k]

        def hook(_module: torch.nn.Module, _args: Any) -> None:
            if self.run is not None:
                if k in self.run.outputs:
                    return  # replayed from its kept output (_Pass.advance)
                if not all(self.source.ready(full) for full, _, _, _ in params):
                    raise _Paused(k)
            for full, owner, attr, meta in params:
                value = self.source.load(full, meta)
                owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
                self.stats.held += meta.numel()
            self.loaded.add(k)
            self.stats.loads += 1
            self.stats.peak = max(self.stats.peak, self.stats.held)

        return hook

    def _freer(self, k: int) -> Any:
        params = self.params[k]

        def hook(_module: torch.nn.Module, _args: Any, out: Any) -> None:
            if k not in self.loaded:
                return
            self.loaded.discard(k)
            for _, owner, attr, meta in params:
                owner._parameters[attr] = meta  # the skeleton's own meta parameter: ties stay as they were
                self.stats.held -= meta.numel()
            if self.run is not None:
                self.run.outputs[k] = out

        return hook

    def needs(self, k: int) -> set[str]:
        """The checkpoint names of unit k's tensors."""
        return {t.info.name for t in (self.source.where(full) for full, _, _, _ in self.params[k]) if t is not None}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class _Pass:
    """One forward over the probe inputs, advanced as far as the files allow; resumed by replaying the units
    already run from their outputs (a few hidden states of the probe: small)."""

    name: str
    streamer: _Streamer
    call: Callable[[], Any]
    outputs: dict[int, Any] = field(default_factory=dict)
    result: Any = None
    waiting: int | None = None  # the unit it paused before

    def advance(self) -> bool:
        if self.result is not None:
            return True
        units, replayed = self.streamer.units, list(self.outputs)
        for k in replayed:
            units[k].forward = _replay(self.outputs[k])  # an instance attribute: the class's forward is untouched
        self.streamer.run = self
        try:
            self.result, self.waiting = self.call(), None
        except _Paused as paused:
            self.waiting = paused.unit
        finally:
            self.streamer.run = None
            for k in replayed:
                units[k].__dict__.pop("forward", None)
        return self.result is not None

    def pending(self) -> list[int]:
        return [] if self.result is not None else [k for k in range(len(self.streamer.units)) if k not in self.outputs]


def _replay(out: Any) -> Callable[..., Any]:
    return lambda *_args, **_kwargs: out


def _refuse_unstreamable(plan: MergePlan, task: str) -> None:
    if task not in STREAMED_TASKS:
        raise LayerStreamError(f"layer-by-layer checks cover causal LMs, not {task}")
    if plan.base.quant is not None and not plan.base.quant.config_only:
        raise LayerStreamError("layer-by-layer checks do not decode quantized bases")
    embed = next((t for t in plan.tensors if t.adapter_key and t.name in plan.base.tensors), None)
    if embed is not None and tuple(plan.base.tensors[embed.name].info.shape) != tuple(embed.shape):
        raise LayerStreamError("layer-by-layer checks do not resize the base's vocabulary as training did")


@dataclass
class DiskView:
    """What a streamed push holds on disk now: each tensor where it is (base shards are located as they
    arrive, merged ones once written) and the files not deleted yet."""

    base: Mapping[str, BaseTensor]
    merged: dict[str, BaseTensor]
    base_present: set[Path] = field(default_factory=set)
    merged_present: set[Path] = field(default_factory=set)


@dataclass
class _Built:
    models: LoadedModels
    stats: StreamStats
    streamers: tuple[_Streamer, _Streamer]  # on base + adapter, on merged


@contextmanager
def _layer_models(
    plan: MergePlan,
    merged_dir: Path,
    merged_stored: Callable[[], Mapping[str, BaseTensor]],
    *,
    device: str,
    view: DiskView | None = None,
) -> Iterator[_Built]:
    """Both skeletons with their streamers; ``merged_dir`` holds the merged config.json."""
    choice = choose_model_class(plan)
    _refuse_unstreamable(plan, choice.task)
    dev, stats = torch.device(device), StreamStats()
    with tempfile.TemporaryDirectory(prefix="lms-stream-") as workdir, ExitStack() as stack:
        base = skeleton(choice.model_class, plan.base.path)
        base_tensors = by_object(checkpoint_tensors(base, plan.base.path, plan.base.tensors), base)
        peft, note = with_adapter(plan, base, Path(workdir), dev)
        try:
            merged = skeleton(choice.model_class, merged_dir)
            merged_tensors = checkpoint_tensors(merged, merged_dir, merged_stored())
        except Exception as exc:
            raise MergedModelLoadError(
                f"The merged folder cannot be read as {choice.model_class.__name__} ({short_error(exc)})."
            ) from exc
        adapted = peft.get_base_model()
        sources = (_Source(by_name(base_tensors, adapted), "base", dev), _Source(merged_tensors, "merged", dev))
        if view is not None:
            sources[0].live, sources[0].present = view.base, view.base_present
            sources[1].live, sources[1].present = view.merged, view.merged_present
        streamers = []
        for model, source in zip((adapted, merged), sources, strict=True):
            buffers_to(model, dev)
            streamers.append(_Streamer(model, source, stats))
            stack.callback(streamers[-1].remove)
            stack.callback(source.files.close)
        models = LoadedModels(
            peft,
            merged,
            None,
            dev,
            DTYPE_FROM_ST[plan.output_dtype],
            token_vocab(adapted),
            0,
            task=choice.task,
            model_class=type(merged).__name__,
            chosen_because=choice.reason,
            notes=[note] if note else [],
        )
        yield _Built(models, stats, (streamers[0], streamers[1]))


@contextmanager
def streamed_models(
    plan: MergePlan, merged_dir: str | Path, *, device: str = "cpu"
) -> Iterator[tuple[LoadedModels, StreamStats]]:
    """PeftModel(base, adapter) and the merged model as weightless skeletons that load one layer at a time.

    Raises LayerStreamError when the model cannot be streamed (task, quantized base, resized vocabulary)
    and MergedModelLoadError when the merged folder lacks a tensor or holds one of the wrong shape.
    """
    merged_dir = Path(merged_dir)
    with _layer_models(plan, merged_dir, lambda: load_base_checkpoint(merged_dir).tensors, device=device) as built:
        yield built.models, built.stats


@contextmanager
def streamed_runs(plan: MergePlan, view: DiskView, config_dir: Path, *, device: str = "cpu") -> Iterator[LayerRuns]:
    """LayerRuns for a streamed push: the merged tensors are the plan's, read from ``view`` as they land."""

    def planned() -> dict[str, BaseTensor]:  # placeholders, never present: the view replaces them once written
        unwritten = config_dir / "not-written"
        return {t.name: BaseTensor(unwritten, TensorInfo(t.name, t.dtype, tuple(t.shape), 0, 0)) for t in plan.tensors}

    with _layer_models(plan, config_dir, planned, device=device, view=view) as built:
        yield LayerRuns(built)


class LayerRuns:
    """The three forwards over the probe inputs (base + adapter with PEFT's math, merged, base alone),
    each advanced unit by unit as far as the tensors on disk allow, then the function rows."""

    def __init__(self, built: _Built) -> None:
        self.models, self.stats = built.models, built.stats
        self.inputs = probe_inputs(self.models)
        # No key/value cache: replayed layers would not fill it, and the rows read the logits only.
        args = {**self.inputs, "use_cache": False}
        peft, merged = self.models.peft, self.models.merged
        adapted = peft.get_base_model()

        def base_alone() -> Any:
            with peft.disable_adapter():
                return adapted(**args)

        on_base, on_merged = built.streamers
        self.passes = [
            _Pass("base + adapter", on_base, lambda: adapted(**args)),
            _Pass("merged", on_merged, lambda: merged(**args)),
            _Pass("base", on_base, base_alone),
        ]

    @torch.no_grad()
    def advance(self) -> bool:
        """Run every unit whose tensors are on disk, in model order; True once all three forwards are done."""
        return all([p.advance() for p in self.passes])  # a list: every pass advances

    def needed(self, which: str) -> tuple[set[str], set[str]]:
        """Checkpoint names ("base" or "merged") the units not run yet read: (the unit each forward paused
        before, the units after it)."""
        now, later = set[str](), set[str]()
        for p in self.passes:
            if p.streamer.source.which == which:
                for k in p.pending():
                    (now if k == p.waiting else later).update(p.streamer.needs(k))
        return now, later

    def source(self, which: str) -> _Source:
        return next(p.streamer.source for p in self.passes if p.streamer.source.which == which)

    def rows(self, why: str = "") -> list[Check]:
        """The causal-LM function rows (logits, top-1, adapter effect); greedy says why not."""
        ref, got, base = (p.result.logits.float() for p in self.passes)
        compared = Compared.of(self.models, ref, got, base)
        tol, stats = compared.tol, self.stats
        top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
        shape = " x ".join(str(n) for n in self.inputs["input_ids"].shape)
        held = f"layer by layer ({stats.units} units per model, at most {stats.peak:,} weights held)"
        greedy = f"skipped: generation needs the whole model in memory{f' ({why})' if why else ''}"
        text = f"random input {shape}, logits up to {compared.scale:.2f}, {held}"
        return [
            compared.diff_check(LOGIT_ROWS[0], self.models, text),
            Check(LOGIT_ROWS[1], "function", top1 >= tol.agreement, f"{top1:.2%}", f">= {tol.agreement:.0%}"),
            Check(LOGIT_ROWS[2], "function", None, "-", "-", greedy),
            compared.effect_check(LOGIT_ROWS[3], "logits"),
        ]


def streamed_logit_checks(
    plan: MergePlan, merged_dir: str | Path, *, device: str = "cpu", why: str = ""
) -> list[Check]:
    """The causal-LM function rows (logits, top-1, adapter effect) computed layer by layer; greedy says why not."""
    merged_dir = Path(merged_dir)
    with _layer_models(plan, merged_dir, lambda: load_base_checkpoint(merged_dir).tensors, device=device) as built:
        runs = LayerRuns(built)
        if not runs.advance():  # every file is there: one advance runs everything
            raise LayerStreamError("the layer-by-layer forward pass stopped before its end")
        return runs.rows(why)
