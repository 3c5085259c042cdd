"""Plan-time specs: plain, picklable records of adapter tensor keys and scalars, loaded into row ops at merge time.

Every spec names the tensor of its module it changes (``tensor``: "weight", "bias", or a parameter name for
LoRA's ``target_parameters``), loads the adapter tensors it needs through ``read_tensor`` widened to the
compute dtype, and says in a few words what it is (``describe``) for the report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from .ops import (
    BaseHadamardRows,
    ColumnRotation,
    ColumnScale,
    CopyRows,
    ExpertLowRank,
    HadamardRows,
    KroneckerRows,
    LowRankRows,
    ReflectRows,
    RowAdd,
    RowOp,
    RowReplace,
    RowScale,
)

ReadTensor = Callable[[str], Tensor]


def _fmt(x: float) -> str:
    return f"{x:g}"


class _Loader:
    def _read(self, read_tensor: ReadTensor, key: str, device, dtype) -> Tensor:
        return read_tensor(key).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Factor:
    """One factor matrix built from adapter tensors at load time.

    ``key`` is read (or, for VeRA's unsaved projections, ``generated``), cut to ``rows``/``cols`` (VeRA's
    shared projections are as large as the largest layer), scaled along one axis by the vector
    ``vector_key`` (VeRA's lambdas, AdaLoRA's singular values, KaSA's diagonal), expanded block-diagonally
    into ``block_diag`` blocks (bdlora), and transposed last.
    """

    key: str
    vector_key: str | None = None
    vector_axis: int = 0  # 0: scale rows, 1: scale columns
    rows: int | None = None
    cols: int | None = None
    block_diag: int = 0
    transpose: bool = False
    generated: tuple[int, int, int, int, int] | None = None  # VeRA: (seed, r, max_in, max_out, which 0=A 1=B)

    def build(self, read_tensor: ReadTensor, *, device, dtype) -> Tensor:
        t = _vera_projection(self.generated) if self.generated else read_tensor(self.key)
        t = t[: t.shape[0] if self.rows is None else self.rows, : t.shape[1] if self.cols is None else self.cols]
        t = t.to(device=device, dtype=dtype)
        if self.vector_key is not None:
            v = read_tensor(self.vector_key).to(device=device, dtype=dtype).reshape(-1)
            t = t * (v.unsqueeze(1) if self.vector_axis == 0 else v.unsqueeze(0))
        if self.block_diag:
            t = torch.block_diag(*torch.chunk(t, self.block_diag, dim=0))
        return t.T.contiguous() if self.transpose else t.contiguous()


def _vera_projection(generated: tuple[int, int, int, int, int]) -> Tensor:
    seed, r, max_in, max_out, which = generated
    return _vera_pair(seed, r, max_in, max_out)[which]


@functools.lru_cache(maxsize=2)
def _vera_pair(seed: int, r: int, max_in: int, max_out: int) -> tuple[Tensor, Tensor]:
    # PEFT draws vera_A then vera_B from one generator seeded with projection_prng_key, so B's values depend on
    # A having been drawn first; cached because every module slices the same pair (never modified in place).
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_a = _kaiming_init((r, max_in), generator=generator)
    return vera_a, _kaiming_init((max_out, r), generator=generator)


@dataclass(frozen=True)
class LowRankSpec(_Loader):
    """tensor += scale * left @ right in the stored orientation."""

    module: str
    tensor: str
    left: Factor
    right: Factor
    scale: float
    label: str

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        return LowRankRows(
            self.left.build(read_tensor, device=device, dtype=dtype),
            self.right.build(read_tensor, device=device, dtype=dtype),
            self.scale,
        )

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True)
class DeloraSpec(_Loader):
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
class HiraSpec(_Loader):
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
class HadamardSpec(_Loader):
    """LoHa: tensor += scale * (w1a @ w1b) * (w2a @ w2b)."""

    module: str
    tensor: str
    w1a: str
    w1b: str
    w2a: str
    w2b: str
    scale: float
    rank: int
    alpha: float

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        w = [self._read(read_tensor, k, device, dtype) for k in (self.w1a, self.w1b, self.w2a, self.w2b)]
        return HadamardRows(*w, scale=self.scale)

    def describe(self) -> str:
        return f"loha r={self.rank} alpha={_fmt(self.alpha)}"


@dataclass(frozen=True)
class KroneckerSpec(_Loader):
    """LoKr: tensor += scale * kron(w1, w2), each side a full matrix (key) or a product of two (key_a @ key_b)."""

    module: str
    tensor: str
    w1: tuple[str, ...]  # (w1,) or (w1_a, w1_b)
    w2: tuple[str, ...]
    scale: float
    rank: int
    alpha: float

    def _side(self, keys: tuple[str, ...], read_tensor: ReadTensor, device, dtype) -> Tensor:
        parts = [self._read(read_tensor, k, device, dtype) for k in keys]
        return parts[0] if len(parts) == 1 else parts[0] @ parts[1]

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        return KroneckerRows(
            self._side(self.w1, read_tensor, device, dtype), self._side(self.w2, read_tensor, device, dtype), self.scale
        )

    def describe(self) -> str:
        return f"lokr r={self.rank} alpha={_fmt(self.alpha)}"


@dataclass(frozen=True)
class ScaleSpec(_Loader):
    """IA3: the stored rows (axis 0) or columns (axis 1) are multiplied by the adapter's vector."""

    module: str
    tensor: str
    key: str
    axis: int
    label: str = "ia3"

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        vector = self._read(read_tensor, self.key, device, dtype).reshape(-1)
        return RowScale(vector) if self.axis == 0 else ColumnScale(vector)

    def describe(self) -> str:
        return f"{self.label} ({'rows' if self.axis == 0 else 'columns'})"


@dataclass(frozen=True)
class AddSpec(_Loader):
    """tensor += scale * vector (LoRA's lora_bias on the layer's bias)."""

    module: str
    tensor: str
    key: str
    scale: float
    label: str = "lora bias"

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        return RowAdd(self._read(read_tensor, self.key, device, dtype).reshape(-1), self.scale)

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True)
class OftSpec(_Loader):
    """OFT: the stored tensor times a block-diagonal rotation from the right (R^T for Linear, R for Embedding)."""

    module: str
    tensor: str
    key: str
    block_size: int
    n_blocks: int
    coft: bool
    eps: float
    block_share: bool
    use_cayley_neumann: bool
    num_cayley_neumann_terms: int
    transpose: bool  # Linear: block @ R^T; Embedding: block @ R

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        from .orthogonal import oft_blocks

        blocks = oft_blocks(self, self._read(read_tensor, self.key, device, dtype))
        return ColumnRotation([(None, blocks.transpose(1, 2).contiguous() if self.transpose else blocks)])

    def describe(self) -> str:
        share = " shared" if self.block_share else ""
        return f"oft blocks={self.n_blocks}x{self.block_size}{share}" + (" coft" if self.coft else "")


@dataclass(frozen=True)
class BoftSpec(_Loader):
    """BOFT: the stored (out, in) weight times the butterfly rotation's transpose from the right."""

    module: str
    tensor: str
    key: str
    block_size: int
    block_num: int
    n_factors: int

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        from .orthogonal import boft_factors

        return ColumnRotation(boft_factors(self, self._read(read_tensor, self.key, device, dtype)))

    def describe(self) -> str:
        return f"boft blocks={self.block_num}x{self.block_size} butterfly={self.n_factors}"


@dataclass(frozen=True)
class HraSpec(_Loader):
    """HRA: the stored (out, in) weight times r Householder reflections from the right."""

    module: str
    tensor: str
    key: str
    apply_gs: bool

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        u = self._read(read_tensor, self.key, device, dtype)
        if not self.apply_gs:
            return ReflectRows(u / u.norm(dim=0), sequential=True)
        # PEFT's Gram-Schmidt: each column made orthogonal to the previous ones, then normalised.
        columns: list[Tensor] = []
        for i in range(u.shape[1]):
            ui = u[:, i]
            for q in columns:
                ui = ui - (q @ ui) * q
            columns.append(ui / ui.norm())
        return ReflectRows(torch.stack(columns, dim=1), sequential=False)

    def describe(self) -> str:
        return "hra" + (" gram-schmidt" if self.apply_gs else "")


@dataclass(frozen=True)
class ReplaceRowsSpec(_Loader):
    """Trainable tokens: the rows ``indices`` of the stored tensor take the adapter's values."""

    module: str
    tensor: str
    key: str
    indices: tuple[int, ...]

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        values = self._read(read_tensor, self.key, device, dtype)
        return RowReplace(torch.tensor(self.indices, dtype=torch.long, device=device), values)

    def describe(self) -> str:
        return f"trainable tokens ({len(self.indices)} rows)"


@dataclass(frozen=True)
class ReplaceSpec(_Loader):
    """LN tuning: the tensor is replaced by the trained copy saved in the adapter."""

    module: str
    tensor: str
    key: str

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        return CopyRows(self._read(read_tensor, self.key, device, dtype))

    def describe(self) -> str:
        return "ln tuning (replaced)"


@dataclass(frozen=True)
class ExpertLowRankSpec(_Loader):
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
        return f"lora experts={self.experts} r={self.rank} alpha={_fmt(self.alpha)}"


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


class Spec(Protocol):
    """What every spec offers: the module and tensor it changes, its row op, and a few words for the report."""

    @property
    def module(self) -> str: ...

    @property
    def tensor(self) -> str: ...

    def load(self, read_tensor: ReadTensor, *, device=None, dtype: torch.dtype = torch.float64) -> RowOp: ...

    def describe(self) -> str: ...


def needs_base(spec: Spec) -> bool:
    """Whether ``spec.load`` needs ``read_base`` (the whole base tensor), as KaSA's SVD truncation does."""
    return bool(getattr(spec, "needs_base", False))
