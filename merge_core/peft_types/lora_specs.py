"""LoRA-family specs beyond two saved factors: DeLoRA, HiRA, fused experts, residual bases (KaSA, PiSSA, OLoRA)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .ops import BaseHadamardRows, ExpertLowRank, LowRankRows, RowOp
from .specs import Factor, ReadTensor, TensorLoader, fmt_number


@dataclass(frozen=True)
class DeloraSpec(TensorLoader):
    """DeLoRA: B diag(lambda / r / (|A_i| |B^i|)) A, each column scaled by the saved base column norm."""

    module: str
    tensor: str
    a: str
    b: str
    lam: str
    w_norm: str
    rank: int

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        a, b = self._read(read_tensor, self.a, device, dtype), self._read(read_tensor, self.b, device, dtype)
        lam = self._read(read_tensor, self.lam, device, dtype).reshape(-1)
        w_norm = self._read(read_tensor, self.w_norm, device, dtype).reshape(-1)
        # PEFT's _compute_delta, its norm floor included.
        diag = lam / self.rank / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))
        return LowRankRows((b * diag).contiguous(), (a * w_norm).contiguous(), 1.0)

    def describe(self) -> str:
        return f"delora r={self.rank}"


@dataclass(frozen=True)
class HiraSpec(TensorLoader):
    """HiRA: tensor += tensor * (left @ right) elementwise, in the stored orientation."""

    module: str
    tensor: str
    left: Factor
    right: Factor
    rank: int

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        left = self.left.build(read_tensor, device=device, dtype=dtype)
        return BaseHadamardRows(left, self.right.build(read_tensor, device=device, dtype=dtype))

    def describe(self) -> str:
        return f"hira r={self.rank}"


@dataclass(frozen=True)
class ExpertLowRankSpec(TensorLoader):
    """LoRA on a stacked (experts, d1, d2) parameter (target_parameters)."""

    module: str
    tensor: str
    a_key: str
    b_key: str
    experts: int
    rank: int
    scale: float
    alpha: float
    transposed: bool

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        a = self._read(read_tensor, self.a_key, device, dtype)
        b = self._read(read_tensor, self.b_key, device, dtype)
        a = a.reshape(self.experts, self.rank, a.shape[-1])
        b = b.reshape(b.shape[0], self.rank, self.experts).permute(2, 0, 1).contiguous()
        return ExpertLowRank(a, b, self.scale, self.transposed)

    def describe(self) -> str:
        return f"lora experts={self.experts} r={self.rank} alpha={fmt_number(self.alpha)}"


@dataclass(frozen=True)
class BaseResidualSpec:
    """The base minus a rank-r part of itself, as PEFT computes it when it loads the adapter.

    KaSA drops the r smallest singular components; an unconverted PiSSA adapter the r largest (its B A
    starts as exactly those); an unconverted OLoRA adapter scale * Q_r R_r of the QR of the stored weight.
    Unlike every other spec this one needs the whole base tensor once, at load time: ``load`` takes
    ``read_base`` (a function returning the full stored tensor).
    """

    module: str
    tensor: str
    rank: int
    kind: str  # "kasa" | "pissa" | "olora"
    scale: float = 1.0
    needs_base: bool = field(default=True, init=False)

    def load(
        self,
        read_tensor: ReadTensor,
        *,
        device=None,
        dtype=torch.float64,
        read_base: Callable[[], Tensor] | None = None,
    ) -> RowOp:
        if read_base is None:
            raise ValueError(f"{self.module}: the {self.kind} residual needs the base tensor; pass read_base.")
        weight = read_base().to(device=device, dtype=dtype)
        if self.kind == "olora":
            q, r = torch.linalg.qr(weight)
            return LowRankRows(q[:, : self.rank].contiguous(), r[: self.rank].contiguous(), -self.scale)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        part = slice(s.shape[0] - self.rank, None) if self.kind == "kasa" else slice(0, self.rank)
        return LowRankRows((u[:, part] * s[part]).contiguous(), vh[part].contiguous(), -1.0)

    def describe(self) -> str:
        return f"{self.kind} residual r={self.rank}"
