"""VeRA and PVeRA: random projections shared by every layer, scaled per layer by learned vectors.

delta = (lambda_b * B[:out]) @ (lambda_d * A[:r, :in]); PVeRA's A and lambda_d hold 2r rows of which its
merge uses the first r (the means). The projections are in the file (save_projection) or regenerated from
projection_prng_key exactly as PEFT draws them, sized by the largest targeted layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import AdapterConfigError, AdapterWeightsError
from .common import AdapterContext, ModuleInput, linear_features, mismatch, peft_config, require
from .specs import Factor, LowRankSpec, Spec

VERA_TOKENS = ("vera_lambda_b", "vera_lambda_d")
VERA_SHARED = ("vera_A", "vera_B")
PVERA_TOKENS = ("pvera_lambda_b", "pvera_lambda_d")
PVERA_SHARED = ("pvera_A", "pvera_B")


@dataclass(frozen=True)
class _Flavor:
    peft_type: str
    prefix: str  # "vera" or "pvera"
    halves: bool  # PVeRA: A and lambda_d hold 2r rows, the merge uses the first r


VERA, PVERA = _Flavor("VERA", "vera", False), _Flavor("PVERA", "pvera", True)


def largest_layer(modules: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    """(largest out_features, largest in_features) over the targets: the shared projections' size."""
    return max(o for o, _ in modules.values()), max(i for _, i in modules.values())


def vera_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    return _ops(VERA, module, context)


def pvera_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    return _ops(PVERA, module, context)


def _ops(flavor: _Flavor, module: ModuleInput, context: AdapterContext) -> list[Spec]:
    out_f, in_f = linear_features(flavor.peft_type, module)
    p = flavor.prefix
    lam_b, lam_d = require(module.name, module.keys, f"{p}_lambda_b", f"{p}_lambda_d")
    d_len, b_len = context.shapes[lam_d][-1], context.shapes[lam_b][-1]
    r = d_len // 2 if flavor.halves else d_len
    if b_len != out_f:
        raise mismatch(module.name, f"{p}_lambda_b has {b_len} entries, the layer {out_f} outputs")
    a, b = _projections(flavor, context, d_len, r, module.name)
    (a_rows, a_cols), (b_rows, b_cols) = _shape(context, a), _shape(context, b)
    if a_rows != d_len or b_cols != r or a_cols < in_f or b_rows < out_f:
        raise mismatch(
            module.name,
            f"the shared projections [{a_rows}, {a_cols}] and [{b_rows}, {b_cols}] do not cover this "
            f"{in_f} -> {out_f} layer at rank {r}",
        )
    left = Factor(b.key, lam_b, 0, rows=out_f, generated=b.generated)
    right = Factor(a.key, lam_d, 0, rows=r, cols=in_f, generated=a.generated)
    if module.stored_transposed:  # stored (in, out): delta^T = right^T @ left^T
        left, right = right.flipped(), left.flipped()
    return [LowRankSpec(module.name, "weight", left, right, 1.0, f"{p} r={r}")]


def _projections(flavor: _Flavor, context: AdapterContext, d_len: int, r: int, module: str) -> tuple[Factor, Factor]:
    p = flavor.prefix
    if f"{p}_A" in context.shared and f"{p}_B" in context.shared:
        return Factor(context.shared[f"{p}_A"]), Factor(context.shared[f"{p}_B"])
    config = peft_config(flavor.peft_type, context.config)
    if config.save_projection:
        raise AdapterWeightsError(
            f"{module}: adapter_config.json says save_projection=true but the file has no {p}_A/{p}_B; "
            "the adapter file is incomplete, save it again with PEFT."
        )
    if context.largest is None:
        raise AdapterConfigError(
            f"{module}: the shared {p} projections are not saved, and regenerating them needs the largest targeted "
            "layer; plan the whole adapter with plan_adapter (or pass its context) instead of one module."
        )
    if r != config.r:
        raise AdapterConfigError(
            f"{module}: adapter_config.json says r={config.r} but {p}_lambda_d has {d_len} entries."
        )
    out_max, in_max = context.largest
    seed = int(config.projection_prng_key)
    return (
        Factor(f"{p}_A (regenerated)", generated=(p, seed, d_len, r, in_max, out_max, 0)),
        Factor(f"{p}_B (regenerated)", generated=(p, seed, d_len, r, in_max, out_max, 1)),
    )


def _shape(context: AdapterContext, f: Factor) -> tuple[int, int]:
    if f.generated is not None:
        _, _, a_rows, b_cols, in_max, out_max, which = f.generated
        return (a_rows, in_max) if which == 0 else (out_max, b_cols)
    shape = tuple(context.shapes[f.key])
    if len(shape) != 2:
        raise mismatch(f.key, f"the shared projection has shape {list(shape)}, not a matrix")
    return shape[0], shape[1]
