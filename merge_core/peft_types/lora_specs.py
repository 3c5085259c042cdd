"""LoRA-family specs beyond two saved factors: DeLoRA, HiRA, fused experts, residual bases (KaSA, PiSSA, OLoRA)."""

from __future__ import annotations

from dataclasses import field

import torch

from .ops import BaseHadamardRows, ExpertLowRank, LowRankRows, RowOp
from .specs import Factor, Reader, Spec, spec_class


@spec_class("delora r={rank}")
class DeloraSpec(Spec):
    """DeLoRA: B diag(lambda / r / (|A_i| |B^i|)) A, each column scaled by the saved base column norm."""

    a: str
    b: str
    lam: str
    w_norm: str
    rank: int

    def row_op(self, read: Reader) -> RowOp:
        a, b, lam, w_norm = read(self.a), read(self.b), read.vector(self.lam), read.vector(self.w_norm)
        # PEFT's _compute_delta, its norm floor included.
        diag = lam / self.rank / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))
        return LowRankRows((b * diag).contiguous(), (a * w_norm).contiguous(), 1.0)


@spec_class("hira r={rank}")
class HiraSpec(Spec):
    """HiRA: tensor += tensor * (left @ right) elementwise, in the stored orientation."""

    left: Factor
    right: Factor
    rank: int

    def row_op(self, read: Reader) -> RowOp:
        return BaseHadamardRows(read.factor(self.left), read.factor(self.right))


@spec_class("lora experts={experts} r={rank} alpha={alpha:g}")
class ExpertLowRankSpec(Spec):
    """LoRA on a stacked (experts, d1, d2) parameter (target_parameters)."""

    a_key: str
    b_key: str
    experts: int
    rank: int
    scale: float
    alpha: float
    transposed: bool

    def row_op(self, read: Reader) -> RowOp:
        a, b = read(self.a_key), read(self.b_key)
        a = a.reshape(self.experts, self.rank, a.shape[-1])
        b = b.reshape(b.shape[0], self.rank, self.experts).permute(2, 0, 1).contiguous()
        return ExpertLowRank(a, b, self.scale, self.transposed)


@spec_class("{kind} residual r={rank}")
class BaseResidualSpec(Spec):
    """The base minus a rank-r part of itself, as PEFT computes it when it loads the adapter.

    KaSA drops the r smallest singular components; an unconverted PiSSA adapter the r largest (its B A
    starts as exactly those); an unconverted OLoRA adapter scale * Q_r R_r of the QR of the stored weight.
    Unlike every other spec this one needs the whole base tensor once, at load time: ``load`` takes
    ``read_base`` (a function returning the full stored tensor).
    """

    rank: int
    kind: str  # "kasa" | "pissa" | "olora"
    scale: float = 1.0
    needs_base: bool = field(default=True, init=False)

    def row_op(self, read: Reader) -> RowOp:
        if read.read_base is None:
            raise ValueError(f"{self.module}: the {self.kind} residual needs the base tensor; pass read_base.")
        weight = read.read_base().to(device=read.device, dtype=read.dtype)
        if self.kind == "olora":
            q, r = torch.linalg.qr(weight)
            return LowRankRows(q[:, : self.rank].contiguous(), r[: self.rank].contiguous(), -self.scale)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        part = slice(s.shape[0] - self.rank, None) if self.kind == "kasa" else slice(0, self.rank)
        return LowRankRows((u[:, part] * s[part]).contiguous(), vh[part].contiguous(), -1.0)
