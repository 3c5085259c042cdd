"""IA3 (learned scaling vectors), trainable tokens (replaced rows), LN tuning (replaced tensors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import AdapterConfigError
from .common import (
    AdapterContext,
    ModuleInput,
    linear_features,
    mismatch,
    refuse,
    require,
    require_matrix,
)
from .specs import ReplaceRowsSpec, ReplaceSpec, ScaleSpec, Spec

IA3_TOKENS = ("ia3_l",)
TOKENS_TOKENS = ("trainable_tokens_delta",)
LN_TUNING_TOKENS = ("ln_tuning_layers",)


# --- IA3 -------------------------------------------------------------------------------------------------


def ia3_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """W * l: l scales output features (rows of an (out, in) weight) or, on feedforward modules, input features."""
    out_f, in_f = linear_features("IA3", module)
    (key,) = require(module.name, module.keys, "ia3_l")
    shape = tuple(context.shapes[key])
    if shape == (out_f, 1) and shape != (1, in_f):
        feedforward = False
    elif shape == (1, in_f) and shape != (out_f, 1):
        feedforward = True
    elif shape == (1, 1):
        feedforward = _is_feedforward(module.name, context.config)
    else:
        raise mismatch(
            module.name,
            f"the IA3 vector has shape {list(shape)}, which fits neither the {out_f} output nor "
            f"the {in_f} input features",
        )
    # Stored (in, out) (Conv1D) swaps which stored axis holds the output features.
    output_axis = 1 if module.stored_transposed else 0
    axis = 1 - output_axis if feedforward else output_axis
    specs: list[Spec] = [ScaleSpec(module.name, "weight", key, axis, "ia3 feedforward" if feedforward else "ia3")]
    if not feedforward and module.has_bias:
        specs.append(ScaleSpec(module.name, "bias", key, 0, "ia3"))
    return specs


def _is_feedforward(module: str, config: Mapping[str, Any]) -> bool:
    import re

    targets = config.get("feedforward_modules") or []
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


# --- trainable tokens ---------------------------------------------------------------------------------------


def token_indices(module: str, config: Mapping[str, Any]) -> list[int]:
    """The token ids of ``module``: TRAINABLE_TOKENS' token_indices, or LoRA's trainable_token_indices."""
    value = config.get("token_indices")
    if value is None:
        value = config.get("trainable_token_indices")
    if isinstance(value, Mapping):
        matches = [v for k, v in value.items() if module == k or module.endswith("." + k)]
        value = matches[0] if len(matches) == 1 else None
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) for i in value):
        raise AdapterConfigError(f"{module}: adapter_config.json names no token indices for these trainable tokens.")
    return list(value)


def tokens_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """Rows of the embedding (or of a tied output embedding) replaced by the trained values."""
    rows, cols = require_matrix("TRAINABLE_TOKENS", module)
    (key,) = require(module.name, module.keys, "trainable_tokens_delta")
    indices = token_indices(module.name, context.config)
    if len(set(indices)) != len(indices):
        raise AdapterConfigError(f"{module.name}: the trainable token indices repeat a token id.")
    if tuple(context.shapes[key]) != (len(indices), cols):
        raise mismatch(
            module.name,
            f"the trained token rows have shape {list(context.shapes[key])}, expected [{len(indices)}, {cols}]",
        )
    if indices and (min(indices) < 0 or max(indices) >= rows):
        raise mismatch(module.name, f"token id {max(indices)} lies outside the {rows}-row embedding")
    if module.stored_transposed:
        raise refuse("TRAINABLE_TOKENS", module.name, "targets a weight stored (in, out)")
    return [ReplaceRowsSpec(module.name, "weight", key, tuple(indices))]


# --- LN tuning -----------------------------------------------------------------------------------------------


def ln_tuning_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """PEFT's merge swaps in the trained copy of the layer: its weight (and bias) replace the base's."""
    specs: list[Spec] = []
    for role, key in module.keys.items():
        tensor = "bias" if role.endswith(".bias") else "weight"
        if role not in ("ln_tuning_layers", "ln_tuning_layers.bias") or (tensor == "bias" and not module.has_bias):
            raise refuse("LN_TUNING", module.name, f"saves {key}, a tensor this tool cannot place in the base")
        expected = module.base_shape if tensor == "weight" else module.base_shape[:1]
        if tuple(context.shapes[key]) != tuple(expected):
            raise mismatch(
                module.name, f"the tuned {tensor} has shape {list(context.shapes[key])}, the base's is {list(expected)}"
            )
        specs.append(ReplaceSpec(module.name, tensor, key))
    return specs
