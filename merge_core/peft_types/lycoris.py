"""LoHa and LoKr (LyCORIS): Hadamard and Kronecker products of small factors, scaled by alpha / r."""

from __future__ import annotations

import functools
import operator

from .common import (
    AdapterContext,
    ModuleInput,
    check_rank,
    configured_alpha,
    configured_rank,
    linear_only,
    mismatch,
    refuse,
    require,
)
from .ops import HadamardRows, KroneckerRows, RowOp
from .specs import Reader, Spec, spec_class

LOHA_TOKENS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TOKENS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@spec_class("loha r={rank} alpha={alpha:g}")
class HadamardSpec(Spec):
    """LoHa: tensor += scale * (w1a @ w1b) * (w2a @ w2b)."""

    w1a: str
    w1b: str
    w2a: str
    w2b: str
    scale: float
    rank: int
    alpha: float

    def row_op(self, read: Reader) -> RowOp:
        return HadamardRows(*(read(k) for k in (self.w1a, self.w1b, self.w2a, self.w2b)), scale=self.scale)


@spec_class("lokr r={rank} alpha={alpha:g}")
class KroneckerSpec(Spec):
    """LoKr: tensor += scale * kron(w1, w2), each side a full matrix (key) or a product of two (key_a @ key_b)."""

    w1: tuple[str, ...]  # (w1,) or (w1_a, w1_b)
    w2: tuple[str, ...]
    scale: float
    rank: int
    alpha: float

    def row_op(self, read: Reader) -> RowOp:
        w1, w2 = (functools.reduce(operator.matmul, [read(k) for k in keys]) for keys in (self.w1, self.w2))
        return KroneckerRows(w1, w2, self.scale)


def _rank_alpha(module: str, config) -> tuple[int, float]:
    return configured_rank(config, module), configured_alpha(config, module, alpha_key="alpha")


def loha_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    if "hada_t1" in module.keys or "hada_t2" in module.keys:
        raise refuse("LOHA", module.name, "uses the CP-decomposed convolution form (use_effective_conv2d)")
    out_f, in_f = linear_only("LOHA", module)
    keys = require(module.name, module.keys, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    r, alpha = _rank_alpha(module.name, context.config)
    check_rank(module.name, context.shapes[keys[0]][-1], r)
    expected = [(out_f, r), (r, in_f), (out_f, r), (r, in_f)]
    for key, shape in zip(keys, expected, strict=True):
        if tuple(context.shapes[key]) != shape:
            raise mismatch(
                module.name,
                f"LoHa factor {key} has shape {list(context.shapes[key])}, expected "
                f"{list(shape)} for a {in_f} -> {out_f} layer at rank {r}",
            )
    return [HadamardSpec(module.name, "weight", *keys, scale=alpha / r, rank=r, alpha=alpha)]


def _lokr_side(module: ModuleInput, context: AdapterContext, side: str) -> tuple[tuple[str, ...], tuple[int, int]]:
    """The keys of one Kronecker factor (full, or a product of two) and its (rows, cols)."""
    keys = module.keys
    if f"lokr_{side}" in keys:
        key = keys[f"lokr_{side}"]
        shape = tuple(context.shapes[key])
        if len(shape) != 2:
            raise refuse("LOKR", module.name, f"has a {len(shape)}-D factor lokr_{side} (a convolution)")
        return (key,), (shape[0], shape[1])
    a, b = require(module.name, keys, f"lokr_{side}_a", f"lokr_{side}_b")
    sa, sb = tuple(context.shapes[a]), tuple(context.shapes[b])
    if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0]:
        raise mismatch(
            module.name, f"LoKr factors lokr_{side}_a {list(sa)} and lokr_{side}_b {list(sb)} do not multiply"
        )
    return (a, b), (sa[0], sb[1])


def lokr_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    if "lokr_t2" in module.keys:
        raise refuse("LOKR", module.name, "uses the CP-decomposed convolution form (use_effective_conv2d)")
    out_f, in_f = linear_only("LOKR", module)
    w1, (a1, c1) = _lokr_side(module, context, "w1")
    w2, (b2, d2) = _lokr_side(module, context, "w2")
    if (a1 * b2, c1 * d2) != (out_f, in_f):
        raise mismatch(
            module.name,
            f"kron of LoKr factors [{a1}, {c1}] and [{b2}, {d2}] is [{a1 * b2}, {c1 * d2}], "
            f"not the layer's [{out_f}, {in_f}]",
        )
    r, alpha = _rank_alpha(module.name, context.config)
    for keys in (w1, w2):
        if len(keys) == 2:
            check_rank(module.name, context.shapes[keys[0]][1], r)
    return [KroneckerSpec(module.name, "weight", w1, w2, scale=alpha / r, rank=r, alpha=alpha)]
