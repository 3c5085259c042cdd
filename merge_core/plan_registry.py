"""Planning adapters of merge_core.peft_types: every PEFT type besides plain LoRA, and LoRA's variants.

Each adapted module is resolved to its base tensors like a LoRA module is; the registry record
turns it into plain-data specs, attached to the output tensors they change and applied by the
executor, row block by row block, before the one rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import AdapterWeightsError, TargetModuleNotFoundError, UnsupportedAdapterError
from .experts import ExpertLayout, FusedParameter, expert_layout, slice_specs
from .plan_lora import CONV1D_MODEL_TYPES
from .plan_types import ModulePlan, OutputTensorPlan
from .safetensors_io import PlannedTensor

_EMBEDDING_LEAVES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "lm_head", "shared", "embeddings")


def _params(
    module: str, resolve: Callable[[str], str | None], config: dict[str, Any], layout: ExpertLayout
) -> dict[str, str]:
    """{parameter leaf: base tensor, or the fused parameter the checkpoint holds per expert} of a module adapted
    through target_parameters (no .weight of its own), in the model's parameter order as PEFT wraps them."""
    leaves = {str(p).rsplit(".", 1)[-1] for p in config.get("target_parameters") or []}
    order = layout.parameter_order.get(module, ())
    found = {}
    for leaf in sorted(leaves, key=lambda leaf: (order.index(leaf) if leaf in order else len(order), leaf)):
        name = f"{module}.{leaf}"
        found[leaf] = resolve(name) or (name if name in layout.fused else None)
    return {leaf: tensor for leaf, tensor in found.items() if tensor is not None}


def _param_shapes(params: dict[str, str], starts: dict[str, PlannedTensor], layout: ExpertLayout) -> dict[str, Any]:
    """Each targeted parameter's shape as the model class has it (a fused one as transformers builds it)."""
    shapes = {}
    for leaf, tensor in params.items():
        fused = layout.fused.get(tensor) if tensor not in starts else None
        if fused is not None and fused.problem:
            raise UnsupportedAdapterError(
                f"The adapter changes {tensor}, which this checkpoint stores as per-expert tensors that cannot take "
                f"its delta ({fused.problem}); merge it into a checkpoint that stores the parameter fused."
            )
        shapes[leaf] = fused.shape if fused is not None else starts[tensor].shape
    return shapes


def registry_plans(
    inp: Any, starts: dict[str, PlannedTensor], plans: dict[str, OutputTensorPlan], notes: list[str]
) -> list[ModulePlan]:
    """Attach every adapted module's specs to the output tensors they change; returns the report rows."""
    from .layouts import transposed_parameter_modules
    from .peft_types import ModuleInput, record_for

    config = inp.config.raw
    record = record_for(inp.config.peft_type)
    shapes = {key: spec.shape for key, spec in inp.adapter.specs.items()}
    conv1d = inp.fan_in_fan_out() or inp.base.model_type in CONV1D_MODEL_TYPES
    parsed = record.parse_adapter(shapes)
    if config.get("trainable_token_indices") and not any(k.endswith("trainable_tokens_delta") for k in shapes):
        # PEFT's load fails on the missing key; merging without the token rows would drop what the config promises.
        raise AdapterWeightsError(
            "adapter_config.json sets trainable_token_indices but the weights hold no trainable_tokens_delta; the "
            "config does not belong to these weights, so save the adapter again with PEFT."
        )
    experts = transposed_parameter_modules(inp.base.path, parsed) if config.get("target_parameters") else set()
    layout = _layout(inp, parsed) if config.get("target_parameters") else ExpertLayout()
    inputs, tensors = {}, {}
    for module, keys in parsed.items():
        weight = inp.resolve(f"{module}.weight")
        params = {} if weight is not None else _params(module, inp.resolve, config, layout)
        if weight is None and not params:
            raise inp.not_found(module, f"{module}.weight")
        prefix = (weight or next(iter(params.values()))).rsplit(".", 1)[0]
        embedding = module.rsplit(".", 1)[-1] in _EMBEDDING_LEAVES
        inputs[module] = ModuleInput(
            module,
            keys,
            starts[weight].shape if weight else (),
            stored_transposed=(conv1d and not embedding) or module in experts,
            has_bias=f"{prefix}.bias" in inp.base.tensors,
            params=_param_shapes(params, starts, layout),
        )
        tensors[module] = {"weight": weight, "bias": f"{prefix}.bias", **params}
    context = record.context(config, shapes, inputs)
    tokens = record.peft_type == "TRAINABLE_TOKENS" or config.get("trainable_token_indices")
    tied = {name for name in inp.virtual if name not in plans} if tokens else set()  # an untied head has its own
    return [_attach(record, inputs[m], context, tensors[m], plans, tied, layout.fused) for m in inputs]


def _layout(inp: Any, modules: dict[str, Any]) -> ExpertLayout:
    shapes = {name: t.info.shape for name, t in inp.base.tensors.items()}
    return expert_layout(inp.base.path, shapes, modules)


def _attach(
    record: Any,
    module: Any,
    context: Any,
    tensors: dict[str, str | None],
    plans: dict[str, OutputTensorPlan],
    tied_heads: set[str],
    fused: dict[str, FusedParameter],
) -> ModulePlan:
    assert record.ops is not None
    specs = record.ops(module, context)
    described = []
    for spec in specs:
        name = tensors.get(spec.tensor)
        if name in tied_heads:
            continue  # a tied head is the embedding: PEFT's token rows there are the embedding's own
        if name in fused and name not in plans:
            for part, part_spec in slice_specs(spec, fused[name]):
                plans[part].ops.append(part_spec)
            described.append(spec.describe() + " (per-expert tensors)")
            continue
        if name is None or name not in plans:
            raise TargetModuleNotFoundError(
                f"The adapter changes {module.name}.{spec.tensor}, which the base model does not have; "
                "check that the adapter belongs to this base model."
            )
        plans[name].ops.append(spec)
        described.append(spec.describe())
    first = tensors.get("weight") or next((t for k, t in tensors.items() if k != "bias" and t), module.name)
    shape = plans[first].shape if first in plans else fused[first].shape if first in fused else ()
    return ModulePlan(
        module.name, str(first), "linear", "; ".join(dict.fromkeys(described)) or record.peft_type.lower(), tuple(shape)
    )
