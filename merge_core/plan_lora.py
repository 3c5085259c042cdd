"""Planning one LoRA module: the low-rank delta in the stored orientation, DoRA, the bias.

The orientation rule: a base tensor is stored (out, in) for nn.Linear and (in, out) for
transformers' Conv1D (fan_in_fan_out) and for embeddings seen from LoRA's side. The stored
delta is therefore scale * B @ A or its transpose, (B @ A).T = A.T @ B.T.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from .adapter import AdapterConfig, AdapterWeights, LoraModule
from .errors import AdapterConfigError, AdapterWeightsError, UnsupportedAdapterError
from .mismatch import Blame
from .plan_types import DoraSpec, LowRankDelta, ModulePlan, OutputTensorPlan

# Models whose linear layers are transformers' Conv1D, stored (in_features, out_features).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt"})


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
    config: AdapterConfig, adapter: AdapterWeights, targets: list[LoraTarget], shapes: dict[str, tuple[int, ...]],
    *, model_type: str,
) -> bool:
    """Whether square Linear-like weights are stored (in, out), as transformers' Conv1D does."""
    if config.fan_in_fan_out or model_type in CONV1D_MODEL_TYPES:
        return True
    for target in targets:
        if target.module.is_embedding:
            continue
        b = adapter.specs[target.module.b].shape
        a = adapter.specs[target.module.a].shape
        if b[0] != a[1] and shapes[target.tensor] == (a[1], b[0]):
            return True
    return False


def checked_rank(config: AdapterConfig, adapter: AdapterWeights, module: LoraModule) -> int:
    """The rank shared by A, B and the config, or an error naming which disagrees."""
    a_shape, b_shape = adapter.specs[module.a].shape, adapter.specs[module.b].shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise UnsupportedAdapterError(
            f"{module.module}: LoRA on layers with {len(a_shape)}-D weights (convolutions) is not supported; "
            "this tool merges LoRA on Linear, Conv1D and Embedding layers."
        )
    rank = a_shape[0]
    if b_shape[1] != rank:
        raise AdapterWeightsError(
            f"{module.module}: lora_A has rank {rank} but lora_B has rank {b_shape[1]}; the adapter file is inconsistent."
        )
    configured = config.rank_for(module.module)
    if configured != rank:
        raise AdapterConfigError(
            f"{module.module}: adapter_config.json says rank {configured} (r / rank_pattern) but the weights have rank "
            f"{rank}. The config does not belong to these weights; save the adapter again with PEFT."
        )
    return rank


def _orientation(module: LoraModule, a_shape, b_shape, w_shape, *, transposed_model: bool, blame: Blame, target: str):
    """(stored transposed?, length of DoRA's magnitude) for a Linear-like module."""
    out_f, in_f = b_shape[0], a_shape[1]
    if (out_f, in_f) == (in_f, out_f) and w_shape == (out_f, in_f):
        return transposed_model, out_f
    if w_shape == (out_f, in_f):
        return False, out_f
    if w_shape == (in_f, out_f):
        return True, out_f
    raise blame.mismatch(
        f"{module.module}: LoRA maps {in_f} -> {out_f} features but the base tensor {target} has shape {list(w_shape)}."
    )


def _delta(module: LoraModule, *, transposed: bool, scale: float, rank: int, alpha: float) -> LowRankDelta:
    if transposed:  # stored (in, out): delta = (B @ A).T = A.T @ B.T
        return LowRankDelta(module.module, module.a, module.b, True, True, scale, rank, alpha)
    return LowRankDelta(module.module, module.b, module.a, False, False, scale, rank, alpha)


def plan_lora_module(
    target: LoraTarget, plan: OutputTensorPlan, *, config: AdapterConfig, adapter: AdapterWeights,
    transposed_model: bool, blame: Blame, base_tensors: Collection[str],
) -> tuple[ModulePlan, list[BiasDelta]]:
    """Add the module's delta (and DoRA) to ``plan``; returns its report row and its bias deltas."""
    module, name, w_shape = target.module, target.module.module, plan.shape
    rank = checked_rank(config, adapter, module)
    a_shape, b_shape = adapter.specs[module.a].shape, adapter.specs[module.b].shape
    if len(w_shape) != 2:
        raise blame.mismatch(f"{name}: the base tensor {target.tensor} has shape {list(w_shape)}, not a 2-D weight matrix.")
    alpha, scale = config.alpha_for(name), config.scale_for(name)
    if module.is_embedding:
        # PEFT: delta = (B @ A).T with A (r, num_embeddings), B (dim, r).
        expected = (a_shape[1], b_shape[0])
        if w_shape != expected:
            raise blame.mismatch(
                f"{name}: embedding LoRA of shape {list(expected)} does not fit the base embedding {target.tensor} "
                f"{list(w_shape)}."
            )
        transposed, mag_len, kind = True, w_shape[1], "embedding"
        fifo, dora_axis = False, "col"
    else:
        transposed, mag_len = _orientation(module, a_shape, b_shape, w_shape, transposed_model=transposed_model,
                                           blame=blame, target=target.tensor)
        kind, fifo, dora_axis = "linear", transposed, ("col" if transposed else "row")
    plan.deltas.append(_delta(module, transposed=transposed, scale=scale, rank=rank, alpha=alpha))
    variant = _plan_dora(module, plan, config=config, adapter=adapter, axis=dora_axis, length=mag_len)
    biases: list[BiasDelta] = []
    if module.b_bias is not None:
        bias_name = target.tensor.rsplit(".", 1)[0] + ".bias"
        if bias_name not in base_tensors:
            raise blame.mismatch(f"{name}: the adapter trains a bias (lora_bias) but the base layer has no bias {bias_name}.")
        biases.append(BiasDelta(bias_name, module.b_bias, scale))
        variant += "+bias"
    if kind == "embedding":
        variant = "embedding-" + variant
    return ModulePlan(name, target.tensor, kind, variant, w_shape, rank, alpha, scale, fifo), biases


def _plan_dora(module: LoraModule, plan: OutputTensorPlan, *, config: AdapterConfig, adapter: AdapterWeights,
               axis: str, length: int) -> str:
    """Attach DoRA's magnitude to ``plan`` when the module has one; returns the variant's name."""
    if module.magnitude is None:
        if config.use_dora:
            raise AdapterWeightsError(
                f"{module.module}: adapter_config.json enables DoRA but the weights have no lora_magnitude_vector "
                "for this module."
            )
        return "rslora" if config.use_rslora else "lora"
    entries = math.prod(adapter.specs[module.magnitude].shape)
    if entries != length:
        raise AdapterWeightsError(f"{module.module}: the DoRA magnitude vector has {entries} entries, expected {length}.")
    if len(plan.deltas) > 1:
        raise UnsupportedAdapterError(f"{module.module}: DoRA cannot be combined with another delta on the same tensor.")
    plan.dora = DoraSpec(module.magnitude, axis)  # type: ignore[arg-type]
    return "dora+rslora" if config.use_rslora else "dora"
