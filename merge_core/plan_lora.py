"""Planning one LoRA module: the low-rank delta in the stored orientation, DoRA, the bias.

The orientation rule: a base tensor is stored (out, in) for nn.Linear and (in, out) for
transformers' Conv1D (fan_in_fan_out) and for embeddings seen from LoRA's side. The stored
delta is therefore scale * B @ A or its transpose, (B @ A).T = A.T @ B.T.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .adapter import AdapterConfig, AdapterWeights, LoraModule
from .errors import AdapterWeightsError, UnsupportedAdapterError
from .factors import CONV1D_MODEL_TYPES, FactorShapes, checked_factors, delta_transposed, model_stores_transposed
from .layouts import conv_settings
from .mismatch import Blame
from .peft_types.common import lora_bias_missing
from .plan_types import DoraSpec, LowRankDelta, ModulePlan, OutputTensorPlan

__all__ = [
    "CONV1D_MODEL_TYPES",
    "BiasDelta",
    "LoraTarget",
    "check_conv_targets",
    "plan_lora_module",
    "weights_transposed",
]


@dataclass(frozen=True)
class BiasDelta:
    """lora_bias: scale * lora_B.bias added to the base layer's bias."""

    bias_tensor: str
    key: str
    scale: float


@dataclass(frozen=True)
class LoraTarget:
    """An adapter module and the base tensor its delta lands on."""

    module: LoraModule
    tensor: str


def weights_transposed(
    config: AdapterConfig,
    adapter: AdapterWeights,
    targets: list[LoraTarget],
    shapes: dict[str, tuple[int, ...]],
    *,
    model_type: str,
    fan_in_fan_out: bool,
) -> bool:
    """Whether square Linear-like weights are stored (in, out), as transformers' Conv1D does.

    ``fan_in_fan_out``: the config's, as PEFT applies it to this model (the planner's ``fan_in_fan_out()``).
    """
    stored = [(checked_factors(config, adapter, t.module), shapes[t.tensor]) for t in targets]
    return model_stores_transposed(fan_in_fan_out=fan_in_fan_out, model_type=model_type, stored=stored)


def check_conv_targets(config_dir: Path, targets: list[LoraTarget], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Refuse LoRA on a convolution whose LoRA branch PEFT builds unlike the layer itself; returns a warning
    when the model class cannot be built here to tell.

    PEFT builds lora_A as ``Conv(in, r, kernel_size, stride, padding)``: no dilation and zero padding
    whatever the base uses, so with dilation (kernel > 1) or another padding_mode the adapted layer is
    no single convolution and no merged weight reproduces it.
    """
    convs = {t.module.module: shapes[t.tensor][2:] for t in targets if len(shapes.get(t.tensor, ())) > 2}
    settings = conv_settings(config_dir, convs) if convs else {}
    if settings is None:
        return [
            f"The model class could not be built here, so the dilation and padding_mode of the {len(convs)} "
            "convolution(s) the adapter changes were not checked; PEFT's LoRA branch assumes dilation 1 and zero "
            "padding, so compare the merged model with PeftModel if the layers use either."
        ]
    for name, (dilation, padding_mode) in settings.items():
        dilated = any(d != 1 and k != 1 for d, k in zip(dilation, convs[name], strict=False))
        if dilated or padding_mode != "zeros":
            setting = f"dilation {list(dilation)}" if dilated else f"padding_mode {padding_mode!r}"
            raise UnsupportedAdapterError(
                f"{name}: the base convolution uses {setting}, which PEFT's LoRA branch does not copy, so the "
                "adapted layer cannot be merged into one convolution; remove this layer from target_modules."
            )
    return []


def _delta(module: LoraModule, *, transposed: bool, scale: float, rank: int, alpha: float) -> LowRankDelta:
    if transposed:  # stored (in, out): delta = (B @ A).T = A.T @ B.T
        return LowRankDelta(module.module, module.a, module.b, True, True, scale, rank, alpha)
    return LowRankDelta(module.module, module.b, module.a, False, False, scale, rank, alpha)


def plan_lora_module(
    target: LoraTarget,
    plan: OutputTensorPlan,
    *,
    config: AdapterConfig,
    adapter: AdapterWeights,
    transposed_model: bool,
    blame: Blame,
    base_tensors: Collection[str],
) -> tuple[ModulePlan, list[BiasDelta]]:
    """Add the module's delta (and DoRA) to ``plan``; returns its report row and its bias deltas."""
    module, name, w_shape = target.module, target.module.module, plan.shape
    factors = checked_factors(config, adapter, module)
    rank = factors.rank
    alpha, scale = config.alpha_for(name), config.scale_for(name)
    transposed = _orientation(factors, target.tensor, w_shape, transposed_model=transposed_model, blame=blame)
    if module.is_embedding:
        kind, fifo, dora_axis, mag_len = "embedding", False, "col", w_shape[1]
    else:
        kind = "conv" if factors.kernel else "linear"
        fifo, dora_axis, mag_len = transposed, ("col" if transposed else "row"), factors.out_features
    plan.deltas.append(_delta(module, transposed=transposed, scale=scale, rank=rank, alpha=alpha))
    variant = _plan_dora(module, plan, config=config, adapter=adapter, axis=dora_axis, length=mag_len)
    biases: list[BiasDelta] = []
    if module.b_bias is not None:
        bias_name = target.tensor.rsplit(".", 1)[0] + ".bias"
        if bias_name not in base_tensors:
            raise blame.mismatch(
                f"{name}: the adapter trains a bias (lora_bias) but the base layer has no bias {bias_name}."
            )
        biases.append(BiasDelta(bias_name, module.b_bias, scale))
        variant += "+bias"
    elif config.lora_bias:
        raise lora_bias_missing(name)
    if kind == "embedding":
        variant = "embedding-" + variant
    return ModulePlan(name, target.tensor, kind, variant, w_shape, rank, alpha, scale, fifo), biases


def _orientation(
    factors: FactorShapes, tensor: str, shape: tuple[int, ...], *, transposed_model: bool, blame: Blame
) -> bool:
    """Whether the delta lands transposed; a convolution's never does (its weight is (out, in, *kernel))."""
    if factors.kernel:
        if shape != (factors.out_features, factors.in_features, *factors.kernel):
            raise blame.mismatch(
                f"{factors.module}: convolution LoRA maps {factors.in_features} -> {factors.out_features} channels "
                f"with kernel {list(factors.kernel)} but the base tensor {tensor} has shape {list(shape)}."
            )
        return False
    if len(shape) != 2:
        raise blame.mismatch(
            f"{factors.module}: the base tensor {tensor} has shape {list(shape)}, not a 2-D weight matrix."
        )
    transposed = delta_transposed(factors, shape, model_transposed=transposed_model)
    if transposed is None:
        raise blame.mismatch(_misfit(factors, tensor, shape))
    return transposed


def _misfit(factors: FactorShapes, tensor: str, shape: tuple[int, ...]) -> str:
    if factors.is_embedding:
        expected = [factors.in_features, factors.out_features]
        return (
            f"{factors.module}: embedding LoRA of shape {expected} does not fit the base embedding {tensor} "
            f"{list(shape)}."
        )
    return (
        f"{factors.module}: LoRA maps {factors.in_features} -> {factors.out_features} features but the base "
        f"tensor {tensor} has shape {list(shape)}."
    )


def _plan_dora(
    module: LoraModule,
    plan: OutputTensorPlan,
    *,
    config: AdapterConfig,
    adapter: AdapterWeights,
    axis: str,
    length: int,
) -> str:
    """Attach DoRA's magnitude to ``plan`` when the module has one; returns the variant's name."""
    if module.magnitude is None:
        if config.use_dora:
            raise AdapterWeightsError(
                f"{module.module}: adapter_config.json enables DoRA but the weights have no lora_magnitude_vector "
                "for this module; the config does not belong to these weights, so save the adapter again with PEFT."
            )
        return "rslora" if config.use_rslora else "lora"
    entries = math.prod(adapter.specs[module.magnitude].shape)
    if entries != length:
        raise AdapterWeightsError(
            f"{module.module}: the DoRA magnitude vector has {entries} entries, expected {length}."
        )
    if len(plan.deltas) > 1:
        raise UnsupportedAdapterError(
            f"{module.module}: DoRA cannot be combined with another delta on the same tensor."
        )
    plan.dora = DoraSpec(module.magnitude, axis)  # type: ignore[arg-type]
    return "dora+rslora" if config.use_rslora else "dora"
