"""Weightless skeletons for the layer-by-layer checks: transformers' own class built from config.json on the
meta device, PEFT's own injection of the adapter into it, the units (decoder layers and the modules with
weights outside them) and the checkpoint tensor behind each meta parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import torch

from .checkpoint import BaseTensor
from .errors import ModelLoadError
from .layouts import model_names
from .model_lock import building_models
from .models import short_error
from .plan import MergePlan
from .reference_adapter import adapter_for_model

# PEFT wraps a base module; the checkpoint names the module itself.
_WRAPPER_PARTS = (".base_layer", ".original_module")


class LayerStreamError(ModelLoadError):
    """The layer-streamed check cannot be built for this model (the row says why)."""


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


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer, and each module outside the layers that owns weights itself."""
    layers = [child for layer_list in _layer_lists(model) for child in layer_list]
    inside = {id(m) for layer in layers for m in layer.modules()}
    others = [
        m
        for m in model.modules()
        if id(m) not in inside and any(p.is_meta for p in m._parameters.values() if p is not None)
    ]
    return layers + others


def meta_params(
    unit: torch.nn.Module, module_names: dict[int, str]
) -> list[tuple[str, torch.nn.Module, str, torch.nn.Parameter]]:
    """(name in the whole model, owner module, attribute, meta parameter) for each weight the unit lacks."""
    found = []
    for module in unit.modules():
        for attr, param in module._parameters.items():
            if param is not None and param.is_meta:
                found.append((f"{module_names[id(module)]}.{attr}", module, attr, param))
    return found


def checkpoint_tensors(
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


def skeleton(model_class: Any, config_dir: Path) -> torch.nn.Module:
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


def with_adapter(plan: MergePlan, base: torch.nn.Module, workdir: Path, device: torch.device) -> tuple[Any, str]:
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


def buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    """Real buffers (rotary frequencies) to the device; the meta weights arrive layer by layer."""
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[key] = buf.to(device)


def by_object(found: dict[str, BaseTensor], model: torch.nn.Module) -> dict[int | str, BaseTensor]:
    """The stored tensor of each parameter object (PEFT renames modules, not the parameters they hold) and name."""
    return {**found, **{id(p): found[n] for n, p in model.named_parameters(remove_duplicate=False) if n in found}}


def by_name(found: dict[int | str, BaseTensor], model: torch.nn.Module) -> dict[str, BaseTensor]:
    """Each parameter of the wrapped model: by object, else by its name outside PEFT's wrappers (untied copies)."""
    named: dict[str, BaseTensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        plain = _plain(name)
        tensor = found.get(id(param), found.get(plain))
        if tensor is not None:
            named[name] = tensor
    return named
