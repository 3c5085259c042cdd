"""IA3 (learned scaling vectors), VeRA (shared random projections scaled by learned vectors), trainable tokens."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import AdapterConfigError, AdapterWeightsError
from .common import (
    AdapterContext,
    ModuleInput,
    linear_features,
    mismatch,
    peft_config,
    refuse,
    require,
    require_matrix,
)
from .specs import Factor, LowRankSpec, ReplaceRowsSpec, ReplaceSpec, ScaleSpec, Spec

IA3_TOKENS = ("ia3_l",)
VERA_TOKENS = ("vera_lambda_b", "vera_lambda_d")
VERA_SHARED = ("vera_A", "vera_B")
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


# --- VeRA ------------------------------------------------------------------------------------------------


def vera_largest(modules: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    """(largest out_features, largest in_features) over VeRA's targets: the shared projections' size."""
    return max(o for o, _ in modules.values()), max(i for _, i in modules.values())


def vera_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """(lambda_b * B[:out]) @ (lambda_d * A[:, :in]), transposed for Conv1D."""
    out_f, in_f = linear_features("VERA", module)
    lam_b, lam_d = require(module.name, module.keys, "vera_lambda_b", "vera_lambda_d")
    r = context.shapes[lam_d][-1]
    if tuple(context.shapes[lam_b])[-1] != out_f:
        raise mismatch(module.name, f"vera_lambda_b has {context.shapes[lam_b][-1]} entries, the layer {out_f} outputs")
    a, b = _vera_projections(context, r, module.name)
    (a_rows, a_cols), (b_rows, b_cols) = _vera_shape(context, a, r, 0), _vera_shape(context, b, r, 1)
    if a_rows != r or b_cols != r or a_cols < in_f or b_rows < out_f:
        raise mismatch(
            module.name,
            f"VeRA's shared projections [{a_rows}, {a_cols}] and [{b_rows}, {b_cols}] do not "
            f"cover this {in_f} -> {out_f} layer at rank {r}",
        )
    t = module.stored_transposed
    left = Factor(b.key, lam_b, 0, rows=out_f, generated=b.generated)
    right = Factor(a.key, lam_d, 0, cols=in_f, generated=a.generated)
    if t:  # stored (in, out): delta^T = right^T @ left^T
        left, right = _transposed(right), _transposed(left)
    return [LowRankSpec(module.name, "weight", left, right, 1.0, f"vera r={r}")]


def _transposed(f: Factor) -> Factor:
    return Factor(f.key, f.vector_key, f.vector_axis, f.rows, f.cols, f.block_diag, not f.transpose, f.generated)


def _vera_projections(context: AdapterContext, r: int, module: str) -> tuple[Factor, Factor]:
    if "vera_A" in context.shared and "vera_B" in context.shared:
        return Factor(context.shared["vera_A"]), Factor(context.shared["vera_B"])
    config = peft_config("VERA", context.config)
    if config.save_projection:
        raise AdapterWeightsError(
            f"{module}: adapter_config.json says save_projection=true but the file has no vera_A/vera_B; "
            "the adapter file is incomplete, save it again with PEFT."
        )
    if context.largest is None:
        raise AdapterConfigError(
            f"{module}: VeRA's shared projections are not saved, and regenerating them needs the largest targeted "
            "layer; plan the whole adapter with plan_adapter (or pass its context) instead of one module."
        )
    if r != config.r:
        raise AdapterConfigError(f"{module}: adapter_config.json says r={config.r} but vera_lambda_d has {r} entries.")
    out_max, in_max = context.largest
    seed = int(config.projection_prng_key)
    return (
        Factor("vera_A (regenerated)", generated=(seed, r, in_max, out_max, 0)),
        Factor("vera_B (regenerated)", generated=(seed, r, in_max, out_max, 1)),
    )


def _vera_shape(context: AdapterContext, f: Factor, r: int, which: int) -> tuple[int, int]:
    if f.generated is not None:
        _, r_, in_max, out_max, _ = f.generated
        return (r_, in_max) if which == 0 else (out_max, r_)
    shape = tuple(context.shapes[f.key])
    if len(shape) != 2:
        raise mismatch("VeRA", f"the shared projection {f.key} has shape {list(shape)}")
    return shape[0], shape[1]


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
