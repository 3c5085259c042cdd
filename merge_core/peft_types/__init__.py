"""Every PEFT type whose merge is row-local, streamed exactly like LoRA: specs at plan time, row ops at merge time.

The planner asks the registry for plain-data specs per adapted module; the executor loads each spec into a
``RowOp`` and applies it to every float64 row block of the stored base tensor, in order, before the one
rounding. Example::

    from merge_core.peft_types import ModuleInput, apply_all_, load_ops, plan_adapter

    def resolve(module, keys):  # module: the adapter's name for it; the planner maps it to the checkpoint
        w = base_shapes[checkpoint_name(module) + ".weight"]
        return ModuleInput(module, keys, w, stored_transposed=is_conv1d, has_bias=...)

    per_module = plan_adapter(config_raw, adapter_shapes, resolve)   # {module: [spec, ...]}
    for module, specs in per_module.items():
        for tensor in {s.tensor for s in specs}:  # "weight", "bias", or a target_parameters name
            ops = load_ops([s for s in specs if s.tensor == tensor], adapter.tensor, device=dev,
                           read_base=lambda: whole_base_tensor)  # read_base: KaSA only (needs_base)
            for a, b in row_blocks(n_rows, step):
                block = base_rows(a, b).to(torch.float64)
                apply_all_(block, a, ops)   # then round once to the output dtype

Ops are applied in list order. Replacements of whole rows or tensors (trainable tokens, LN tuning) and
multiplicative ops (IA3, OFT, BOFT, HRA) do not commute with other updates of the same tensor: order
several adapters on one tensor as PEFT would merge them. Adapter keys no record claims
(``record.unclaimed_keys``) are modules_to_save copies, saved embeddings or trained biases for the LoRA
planner's replacement rules. Trainable tokens on an embedding tied to the output layer: apply the same
specs to the output embedding when the checkpoint stores it as its own tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .common import AdapterContext, ModuleInput, ModuleKeys, Shape
from .ops import RowOp, apply_all_
from .registry import REGISTRY, PeftTypeRecord, peft_type_support, record_for
from .specs import ReadTensor, Spec, needs_base


def uses_registry(config_raw: Mapping[str, Any]) -> bool:
    """True for adapters this package plans: every non-LoRA type, and LoRA with a variant the LoRA planner lacks."""
    from .lora_family import needs_lora_variants

    return str(config_raw.get("peft_type", "")).upper() != "LORA" or needs_lora_variants(config_raw)


def plan_adapter(
    config_raw: Mapping[str, Any],
    adapter_shapes: Mapping[str, Shape],
    resolve: Callable[[str, ModuleKeys], ModuleInput],
) -> dict[str, list[Spec]]:
    """Specs per adapted module for a whole adapter.

    Args:
        config_raw: adapter_config.json as a dict (its ``peft_type`` picks the record).
        adapter_shapes: every adapter key -> shape (the safetensors header).
        resolve: (module name, its {role: key}) -> ModuleInput with the base shape and orientation.

    Returns:
        {module name: [spec, ...]} in application order; each spec's ``tensor`` names the module's tensor.
    """
    record = record_for(str(config_raw.get("peft_type", "")))
    parsed = record.parse_adapter(adapter_shapes)
    inputs = {module: resolve(module, keys) for module, keys in parsed.items()}
    context = record.context(config_raw, adapter_shapes, inputs)
    assert record.ops is not None
    return {module: record.ops(module_input, context) for module, module_input in inputs.items()}


def load_ops(
    specs: list[Spec],
    read_tensor: ReadTensor,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    read_base: Callable[[], Tensor] | None = None,
) -> list[RowOp]:
    """Load specs into row ops; ``read_base`` (the whole stored tensor) is read only by specs that ``needs_base``."""
    return [spec.load(read_tensor, device=device, dtype=dtype, read_base=read_base) for spec in specs]


__all__ = [
    "REGISTRY",
    "AdapterContext",
    "ModuleInput",
    "ModuleKeys",
    "PeftTypeRecord",
    "RowOp",
    "Spec",
    "apply_all_",
    "load_ops",
    "needs_base",
    "peft_type_support",
    "plan_adapter",
    "record_for",
    "uses_registry",
]
