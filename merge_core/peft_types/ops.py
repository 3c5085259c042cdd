"""Row operations: every update PEFT's merge performs, computed for rows [a, b) of the stored tensor only.

A row block is the slice ``block = W[a:b]`` of the stored base tensor, already widened to the compute
dtype (float64). Each op changes it in place and returns it; none ever forms the whole delta matrix, only
the rows it is asked for (column transforms form one block-sized temporary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..tensor_math import as_matrix


@runtime_checkable
class RowOp(Protocol):
    """An update of rows [row_start, row_start + len(block)) of one stored tensor."""

    def apply_(self, block: Tensor, row_start: int) -> Tensor: ...


def _rows(block: Tensor) -> int:
    return block.shape[0] if block.dim() else 1


@dataclass
class LowRankRows:
    """block += scale * left[a:b] @ right (LoRA, AdaLoRA, VeRA, bdlora, KaSA's truncation)."""

    left: Tensor  # (rows_total, r)
    right: Tensor  # (r, cols)
    scale: float

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        rows = _rows(block)
        as_matrix(block).addmm_(self.left[row_start : row_start + rows], self.right, alpha=self.scale)
        return block


@dataclass
class RowAdd:
    """block += scale * vector[a:b] (LoRA's trained bias on a 1-D bias tensor)."""

    vector: Tensor  # (rows_total,)
    scale: float

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        part = self.vector[row_start : row_start + _rows(block)]
        return block.add_(part.view(-1, *([1] * (block.dim() - 1))), alpha=self.scale)


@dataclass
class BaseHadamardRows:
    """HiRA: block += block * (left[a:b] @ right), the low-rank product gating the base weight elementwise."""

    left: Tensor
    right: Tensor

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        gate = self.left[row_start : row_start + _rows(block)] @ self.right
        x = as_matrix(block)
        x.addcmul_(x, gate)
        return block


@dataclass
class HadamardRows:
    """LoHa: block += scale * (w1a[a:b] @ w1b) * (w2a[a:b] @ w2b)."""

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    scale: float

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        end = row_start + _rows(block)
        first = self.w1a[row_start:end] @ self.w1b
        first.mul_(self.w2a[row_start:end] @ self.w2b)
        as_matrix(block).add_(first, alpha=self.scale)
        return block


@dataclass
class KroneckerRows:
    """LoKr: block += scale * kron(w1, w2)[a:b], each row built from one row of w1 and one of w2."""

    w1: Tensor  # (a1, c1)
    w2: Tensor  # (b2, d2); kron(w1, w2)[i * b2 + j, k * d2 + l] = w1[i, k] * w2[j, l]
    scale: float

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        rows = torch.arange(row_start, row_start + _rows(block), device=self.w1.device)
        b2 = self.w2.shape[0]
        part = self.w1[rows // b2].unsqueeze(2) * self.w2[rows % b2].unsqueeze(1)
        as_matrix(block).add_(part.reshape(len(rows), -1), alpha=self.scale)
        return block


@dataclass
class RowScale:
    """block[i] *= factor[a + i] (IA3 on output features, BOFT's magnitude, IA3 on a bias)."""

    factor: Tensor  # (rows_total,)

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        part = self.factor[row_start : row_start + _rows(block)]
        return block.mul_(part.view(-1, *([1] * (block.dim() - 1))))


@dataclass
class ColumnScale:
    """block[:, j] *= factor[j] (IA3 on input features)."""

    factor: Tensor  # (cols,)

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        as_matrix(block).mul_(self.factor)
        return block


@dataclass
class ColumnRotation:
    """block = block @ M, M a product of permuted block-diagonal matrices (OFT, BOFT).

    Each factor is (perm, blocks): columns are gathered by the inverse permutation, multiplied by the
    block-diagonal ``blocks`` (n, size, size) segment by segment, and scattered back by ``perm``;
    a factor without a permutation is a plain block-diagonal matrix.
    """

    factors: list[tuple[Tensor | None, Tensor]]

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        x = as_matrix(block)
        out = x
        for perm, blocks in self.factors:
            if perm is not None:
                out = out[:, torch.argsort(perm)]
            n, size, _ = blocks.shape
            out = torch.bmm(out.reshape(-1, n, size).transpose(0, 1), blocks).transpose(0, 1).reshape(x.shape)
            if perm is not None:
                out = out[:, perm]
        x.copy_(out)
        return block


@dataclass
class ReflectRows:
    """block = block @ H for H a product of Householder reflections I - 2 u u^T (HRA), never formed.

    ``sequential``: H = (I - 2 u_0 u_0^T) ... (I - 2 u_{r-1} u_{r-1}^T), applied one reflection at a time;
    otherwise the u are orthonormal and H = I - 2 U U^T, one low-rank update.
    """

    u: Tensor  # (cols, r), unit columns
    sequential: bool

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        x = as_matrix(block)
        if not self.sequential:
            x.addmm_(x @ self.u, self.u.T, alpha=-2.0)
            return block
        for i in range(self.u.shape[1]):
            ui = self.u[:, i : i + 1]
            x.addmm_(x @ ui, ui.T, alpha=-2.0)
        return block


@dataclass
class RowReplace:
    """Rows listed in ``indices`` take the given values (trainable tokens)."""

    indices: Tensor  # (k,) int64, distinct
    values: Tensor  # (k, cols)

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        end = row_start + _rows(block)
        inside = (self.indices >= row_start) & (self.indices < end)
        if bool(inside.any()):
            as_matrix(block)[self.indices[inside] - row_start] = self.values[inside]
        return block


@dataclass
class CopyRows:
    """block = values[a:b]: the whole tensor is replaced (LN tuning swaps in its trained layer)."""

    values: Tensor

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        return block.copy_(self.values[row_start : row_start + _rows(block)])


@dataclass
class ExpertLowRank:
    """LoRA on a stacked (experts, d1, d2) parameter: block[e] += scale * B_e @ A_e (or its transpose).

    PEFT's ParamWrapper keeps A as (experts * r, in) grouped by expert and B as (out, r * experts) with the
    expert index varying fastest, so A_e = A[e*r:(e+1)*r] and B_e = B[:, e::experts].
    """

    a: Tensor  # (experts, r, in)
    b: Tensor  # (experts, out, r)
    scale: float
    transposed: bool  # stored (experts, in, out) rather than (experts, out, in)

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        end = row_start + _rows(block)
        a, b = self.a[row_start:end], self.b[row_start:end]
        delta = torch.bmm(a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else torch.bmm(b, a)
        return block.add_(delta, alpha=self.scale)


def apply_all_(block: Tensor, row_start: int, ops: list[RowOp]) -> Tensor:
    """Apply ``ops`` in order to one row block."""
    for op in ops:
        block = op.apply_(block, row_start)
    return block
