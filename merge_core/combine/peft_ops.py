"""The per-module arithmetic of PEFT 0.21.2's LoraModel.add_weighted_adapter, one function per layout.

The tensor mixing itself is PEFT's own (peft.utils.merge_utils, through types.Arithmetic), so the
results equal PEFT's by construction; what is here is the part PEFT does inline on its layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .types import CombinationOptions, CombinationType, Layout

# Above this many elements in one full SVD factor the reduced SVD is computed instead of PEFT's
# full_matrices=True (same leading singular vectors up to float rounding; PEFT would need e.g.
# vocab x vocab floats for an embedding and run out of memory).
FULL_SVD_LIMIT = 1 << 29


@dataclass(frozen=True)
class Term:
    """One adapter's part in one module: its factors, its LoRA scale and its weight in the combination."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    weight: float


@dataclass(frozen=True)
class ModuleResult:
    a: torch.Tensor
    b: torch.Tensor
    reduced_svd: bool = False  # the reduced SVD stood in for PEFT's full one (FULL_SVD_LIMIT)


def combine_module(
    ctype: CombinationType, terms: list[Term], *, rank: int, transposed: bool, options: CombinationOptions
) -> ModuleResult:
    """The new (a, b) of one module; ``transposed``: PEFT's delta of this layer is (b @ a).T."""
    if ctype.layout is Layout.CONCAT:
        a = torch.cat([t.a * t.weight * t.scale for t in terms], dim=0)
        return ModuleResult(a, torch.cat([t.b for t in terms], dim=1))
    if ctype.layout is Layout.SVD:
        return _svd_module(ctype, terms, rank=rank, transposed=transposed, options=options)
    return _factors_module(ctype, terms, options)


def _factors_module(ctype: CombinationType, terms: list[Term], options: CombinationOptions) -> ModuleResult:
    """The a's and the b's mixed separately, the signed weight's square root on each side."""
    weights_a, weights_b = [], []
    for t in terms:
        ws = t.weight * t.scale
        # The sign goes on one side only, or two negative signs would cancel.
        weights_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        weights_b.append(math.sqrt(abs(ws)))
    mix = ctype.arithmetic
    assert mix is not None, ctype  # every FACTORS type names its arithmetic (types.TYPES)
    a = mix([t.a for t in terms], torch.tensor(weights_a), density=options.density, majority_sign=options.majority_sign)
    b = mix([t.b for t in terms], torch.tensor(weights_b), density=options.density, majority_sign=options.majority_sign)
    return ModuleResult(a.to(terms[0].a.dtype), b.to(terms[0].b.dtype))


def _svd_module(
    ctype: CombinationType, terms: list[Term], *, rank: int, transposed: bool, options: CombinationOptions
) -> ModuleResult:
    """The full deltas mixed, then truncated to ``rank`` by an SVD (kohya's svd_merge_lora, as PEFT does)."""
    # get_delta_weight: transpose(b @ a, fan_in_fan_out or embedding) * scaling
    deltas = [((t.b @ t.a).T if transposed else (t.b @ t.a)) * t.scale for t in terms]
    mix = ctype.arithmetic
    assert mix is not None, ctype  # every SVD type names its arithmetic (types.TYPES)
    weights = torch.tensor([t.weight for t in terms])
    delta = mix(deltas, weights, density=options.density, majority_sign=options.majority_sign)
    if transposed:
        delta = delta.T
    full = max(delta.shape) ** 2 <= FULL_SVD_LIMIT
    u, s, vh = torch.linalg.svd(delta, full_matrices=full)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if options.svd_clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), options.svd_clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return ModuleResult(vh, u, reduced_svd=not full)
