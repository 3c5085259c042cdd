"""Function rows of causal LMs computed layer by layer, for models that do not fit in memory.

Both models are built without weights (accelerate's ``init_empty_weights``, transformers' own class
from config.json) and PEFT injects the adapter into the base skeleton as ``PeftModel.from_pretrained``
does. A forward pre-hook on each decoder layer (and on each module with weights outside the layers:
embeddings, final norm, head) reads that module's tensors from the safetensors files just before it
runs; a forward hook puts them back on the meta device right after. The model's own forward then runs
unchanged (rotary embeddings, masks, PEFT's unmerged LoRA math), holding one layer's weights at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from .checkpoint import BaseTensor, load_base_checkpoint
from .errors import ModelLoadError
from .layouts import model_names
from .model_lock import building_models
from .models import LoadedModels, MergedModelLoadError, choose_model_class, short_error, token_vocab
from .plan import MergePlan
from .reference_adapter import adapter_for_model
from .safetensors_io import DTYPE_FROM_ST, OpenFiles, read_rows
from .tasks import LOGIT_ROWS, Compared, probe_inputs, three_ways
from .verify_report import Check

STREAMED_TASKS = ("CAUSAL_LM",)
# PEFT wraps a base module; the checkpoint names the module itself.
_WRAPPER_PARTS = (".base_layer", ".original_module")


class LayerStreamError(ModelLoadError):
    """The layer-streamed check cannot be built for this model (the row says why)."""


@dataclass
class StreamStats:
    """What the hooks materialised: the proof that one unit (about one layer) is held at a time."""

    units: int = 0  # hooked modules per model
    loads: int = 0  # unit loads over all forward passes
    held: int = 0  # elements materialised right now
    peak: int = 0  # most elements materialised at once
    largest_unit: int = 0  # elements of the largest unit


@dataclass
class _Source:
    """Where each parameter of one skeleton comes from: {parameter name: checkpoint tensor}."""

    tensors: dict[str, BaseTensor]  # by parameter name in the model
    which: str  # "base" or "merged", for messages
    device: torch.device
    files: OpenFiles = field(default_factory=OpenFiles)

    def load(self, name: str, like: torch.Tensor) -> torch.Tensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise self._error(f"the {self.which} checkpoint has no tensor for {name}")
        # Plain reads, not a memory map: mapped pages of a 26 GB checkpoint would count as held memory.
        info = tensor.info
        value = read_rows(self.files.get(tensor.shard), info, 0, info.shape[0] if info.shape else 1)
        value = value.to(self.device, like.dtype)
        if tuple(value.shape) != tuple(like.shape):
            raise self._error(
                f"the {self.which} checkpoint's {tensor.info.name} has shape {list(value.shape)}, "
                f"the model expects {list(like.shape)}"
            )
        return value

    def _error(self, text: str) -> ModelLoadError:
        return (MergedModelLoadError if self.which == "merged" else LayerStreamError)(text[:1].upper() + text[1:] + ".")


class _Streamer:
    """Hooks that materialise one unit of a skeleton before it runs and free it after."""

    def __init__(self, model: torch.nn.Module, source: _Source, stats: StreamStats):
        self.source, self.stats = source, stats
        self.handles: list[Any] = []
        module_names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        units = _units(model)
        stats.units = len(units)
        for unit in units:
            params = _meta_params(unit, module_names)
            stats.largest_unit = max(stats.largest_unit, sum(p.numel() for _, _, _, p in params))
            self.handles.append(unit.register_forward_pre_hook(self._loader(params)))
            self.handles.append(unit.register_forward_hook(self._freer(params)))

    def _loader(self, params: list[tuple[str, torch.nn.Module, str, torch.nn.Parameter]]) -> Any:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            for full, owner, attr, meta in params:
                value = self.source.load(full, meta)
                owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
                self.stats.held += meta.numel()
            self.stats.loads += 1
            self.stats.peak = max(self.stats.peak, self.stats.held)

        return hook

    def _freer(self, params: list[tuple[str, torch.nn.Module, str, torch.nn.Parameter]]) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            for _, owner, attr, meta in params:
                owner._parameters[attr] = meta  # the skeleton's own meta parameter: ties stay as they were
                self.stats.held -= meta.numel()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _layer_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The decoder layer lists: every ModuleList whose children hold weights (not nested in another)."""
    lists: list[torch.nn.ModuleList] = []
    for module in model.modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) > 1
            and not any(module in m.modules() for m in lists)
        ):
            if all(any(True for _ in child.parameters()) for child in module):
                lists.append(module)
    return lists


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer, and each module outside the layers that owns weights itself."""
    layers = [child for layer_list in _layer_lists(model) for child in layer_list]
    inside = {id(m) for layer in layers for m in layer.modules()}
    others = [
        m
        for m in model.modules()
        if id(m) not in inside and any(p.is_meta for p in m._parameters.values() if p is not None)
    ]
    return layers + others


def _meta_params(
    unit: torch.nn.Module, module_names: dict[int, str]
) -> list[tuple[str, torch.nn.Module, str, torch.nn.Parameter]]:
    """(name in the whole model, owner module, attribute, meta parameter) for each weight the unit lacks."""
    found = []
    for module in unit.modules():
        for attr, param in module._parameters.items():
            if param is not None and param.is_meta:
                found.append((f"{module_names[id(module)]}.{attr}", module, attr, param))
    return found


def _checkpoint_tensors(
    model: torch.nn.Module, config_dir: Path, stored: dict[str, BaseTensor]
) -> dict[str, BaseTensor]:
    """{parameter name: stored tensor} for each meta parameter, through PEFT's wrappers, renamings and ties."""
    renamed = model_names(config_dir, list(stored))
    found: dict[str, BaseTensor] = {}
    by_object: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.is_meta:
            continue
        by_object.setdefault(id(param), []).append(name)
        plain = _plain(name)
        key = renamed.get(plain, plain)
        if key in stored:
            found[name] = stored[key]
    for names in by_object.values():  # tied weights: the checkpoint stores one of the names
        present = next((found[n] for n in names if n in found), None)
        for n in names:
            if present is not None:
                found.setdefault(n, present)
    return found


def _plain(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _skeleton(model_class: Any, config_dir: Path) -> torch.nn.Module:
    """The model class built from config.json with every weight on the meta device (buffers stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    with building_models(), init_empty_weights():
        if hasattr(model_class, "_model_mapping"):  # an Auto class
            model = model_class.from_config(config, dtype=torch.float32)
        else:
            model = model_class._from_config(config, dtype=torch.float32)
    model.tie_weights()  # tied heads share the embedding's parameter, which is the one the checkpoint stores
    return model.eval()


def _with_adapter(plan: MergePlan, base: torch.nn.Module, workdir: Path, device: torch.device) -> tuple[Any, str]:
    """PeftModel(base skeleton, adapter): PEFT's own injection, the adapter's tensors real, the base's meta."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_dir, note = adapter_for_model(plan, base, workdir)
    # PEFT moves each loaded adapter to its base layer's device, meta here: the adapter stays where it loaded.
    # The patch is process-wide, so no other build may run meanwhile (model_lock).
    with (
        building_models(),
        mock.patch.object(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda *_a, **_k: None),
    ):
        try:
            peft = PeftModel.from_pretrained(base, adapter_dir, low_cpu_mem_usage=True)
        except Exception as exc:
            raise LayerStreamError(
                f"PEFT could not load the adapter onto the base skeleton ({short_error(exc)})."
            ) from exc
    missing = [n for n, p in peft.named_parameters() if p.is_meta and ("lora_" in n or "modules_to_save" in n)]
    if missing:
        raise LayerStreamError(f"PEFT left the adapter tensor {missing[0]} unloaded on the base skeleton.")
    for param in peft.parameters():
        if not param.is_meta and param.is_floating_point():
            # As PEFT moves the adapter to its float32 base layer (PEFT loads it onto its own choice of device).
            param.data = param.data.to(device, torch.float32)
    return peft.eval(), note


def _buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    """Real buffers (rotary frequencies) to the device; the meta weights arrive layer by layer."""
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[key] = buf.to(device)


def _refuse_unstreamable(plan: MergePlan, task: str) -> None:
    if task not in STREAMED_TASKS:
        raise LayerStreamError(f"layer-by-layer checks cover causal LMs, not {task}")
    if plan.base.quant is not None and not plan.base.quant.config_only:
        raise LayerStreamError("layer-by-layer checks do not decode quantized bases")
    embed = next((t for t in plan.tensors if t.adapter_key and t.name in plan.base.tensors), None)
    if embed is not None and tuple(plan.base.tensors[embed.name].info.shape) != tuple(embed.shape):
        raise LayerStreamError("layer-by-layer checks do not resize the base's vocabulary as training did")


@contextmanager
def streamed_models(
    plan: MergePlan, merged_dir: str | Path, *, device: str = "cpu"
) -> Iterator[tuple[LoadedModels, StreamStats]]:
    """PeftModel(base, adapter) and the merged model as weightless skeletons that load one layer at a time.

    Raises LayerStreamError when the model cannot be streamed (task, quantized base, resized vocabulary)
    and MergedModelLoadError when the merged folder lacks a tensor or holds one of the wrong shape.
    """
    choice = choose_model_class(plan)
    _refuse_unstreamable(plan, choice.task)
    dev, stats = torch.device(device), StreamStats()
    with tempfile.TemporaryDirectory(prefix="lms-stream-") as workdir, ExitStack() as stack:
        base = _skeleton(choice.model_class, plan.base.path)
        base_tensors = _by_object(_checkpoint_tensors(base, plan.base.path, plan.base.tensors), base)
        peft, note = _with_adapter(plan, base, Path(workdir), dev)
        merged_dir = Path(merged_dir)
        try:
            merged = _skeleton(choice.model_class, merged_dir)
            merged_tensors = _checkpoint_tensors(merged, merged_dir, load_base_checkpoint(merged_dir).tensors)
        except Exception as exc:
            raise MergedModelLoadError(
                f"The merged folder cannot be read as {choice.model_class.__name__} ({short_error(exc)})."
            ) from exc
        adapted = peft.get_base_model()
        for model, source in (
            (adapted, _Source(_by_name(base_tensors, adapted), "base", dev)),
            (merged, _Source(merged_tensors, "merged", dev)),
        ):
            _buffers_to(model, dev)
            stack.callback(_Streamer(model, source, stats).remove)
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
        yield models, stats


def _by_object(found: dict[str, BaseTensor], model: torch.nn.Module) -> dict[int | str, BaseTensor]:
    """The stored tensor of each parameter object (PEFT renames modules, not the parameters they hold) and name."""
    return {**found, **{id(p): found[n] for n, p in model.named_parameters(remove_duplicate=False) if n in found}}


def _by_name(found: dict[int | str, BaseTensor], model: torch.nn.Module) -> dict[str, BaseTensor]:
    """Each parameter of the wrapped model: by object, else by its name outside PEFT's wrappers (untied copies)."""
    named: dict[str, BaseTensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        plain = _plain(name)
        tensor = found.get(id(param), found.get(plain))
        if tensor is not None:
            named[name] = tensor
    return named


@torch.no_grad()
def streamed_logit_checks(
    plan: MergePlan, merged_dir: str | Path, *, device: str = "cpu", why: str = ""
) -> list[Check]:
    """The causal-LM function rows (logits, top-1, adapter effect) computed layer by layer; greedy says why not."""
    with streamed_models(plan, merged_dir, device=device) as (models, stats):
        inputs = probe_inputs(models)
        ref, got, base = (out.logits.float() for out in three_ways(models, inputs))
    compared = Compared.of(models, ref, got, base)
    tol = compared.tol
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    shape = " x ".join(str(n) for n in inputs["input_ids"].shape)
    held = f"layer by layer ({stats.units} units per model, at most {stats.peak:,} weights held)"
    greedy = f"skipped: generation needs the whole model in memory{f' ({why})' if why else ''}"
    return [
        compared.diff_check(LOGIT_ROWS[0], models, f"random input {shape}, logits up to {compared.scale:.2f}, {held}"),
        Check(LOGIT_ROWS[1], "function", top1 >= tol.agreement, f"{top1:.2%}", f">= {tol.agreement:.0%}"),
        Check(LOGIT_ROWS[2], "function", None, "-", "-", greedy),
        compared.effect_check(LOGIT_ROWS[3], "logits"),
    ]
