"""Plan-time specs: plain, picklable records of adapter tensor keys and scalars, loaded into row ops at merge time.

Every spec names the tensor of its module it changes (``tensor``: "weight", "bias", or a parameter name for
LoRA's ``target_parameters``), forms its row op from the adapter tensors a ``Reader`` hands it widened to the
compute dtype, and says in a few words what it is (``describe``) for the report. ``spec_class`` makes the
frozen dataclass of each kind.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar, dataclass_transform

import torch
from torch import Tensor

from .ops import (
    ColumnScale,
    CopyRows,
    LowRankRows,
    RowAdd,
    RowOp,
    RowReplace,
    RowScale,
)

ReadTensor = Callable[[str], Tensor]


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
    # VeRA/PVeRA: (kind, seed, rows of A, columns of B, largest in, largest out, which: 0 = A, 1 = B)
    generated: tuple | None = None

    def build(self, read_tensor: ReadTensor, *, device, dtype) -> Tensor:
        t = _vera_projection(self.generated) if self.generated else read_tensor(self.key)
        t = t[: t.shape[0] if self.rows is None else self.rows, : t.shape[1] if self.cols is None else self.cols]
        t = t.to(device=device, dtype=dtype)
        if self.vector_key is not None:
            v = read_tensor(self.vector_key).to(device=device, dtype=dtype).reshape(-1)
            v = v[: t.shape[self.vector_axis]]  # PVeRA keeps the first half of lambda_d
            t = t * (v.unsqueeze(1) if self.vector_axis == 0 else v.unsqueeze(0))
        if self.block_diag:
            t = torch.block_diag(*torch.chunk(t, self.block_diag, dim=0))
        return t.T.contiguous() if self.transpose else t.contiguous()

    def flipped(self) -> Factor:
        """The same factor transposed: (left @ right)^T is right.flipped() @ left.flipped()."""
        return dataclasses.replace(self, transpose=not self.transpose)


def _vera_projection(generated: tuple) -> Tensor:
    kind, seed, a_rows, b_cols, max_in, max_out, which = generated
    return _vera_pair(kind, seed, a_rows, b_cols, max_in, max_out)[which]


@functools.lru_cache(maxsize=2)
def _vera_pair(kind: str, seed: int, a_rows: int, b_cols: int, max_in: int, max_out: int) -> tuple[Tensor, Tensor]:
    # PEFT draws A then B from one generator seeded with projection_prng_key, so B's values depend on A having
    # been drawn first; cached because every module slices the same pair (never modified in place).
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "pvera":  # PVeRA draws with torch's own kaiming_uniform_
        a = torch.nn.init.kaiming_uniform_(torch.empty(a_rows, max_in), generator=generator)
        return a, torch.nn.init.kaiming_uniform_(torch.empty(max_out, b_cols), generator=generator)
    a = _kaiming_init((a_rows, max_in), generator=generator)
    return a, _kaiming_init((max_out, b_cols), generator=generator)


@dataclass(frozen=True)
class Reader:
    """The adapter as a spec's ``row_op`` reads it: tensors widened to the compute dtype on the compute device."""

    read_tensor: ReadTensor
    device: torch.device | str | None
    dtype: torch.dtype
    read_base: Callable[[], Tensor] | None = None  # the whole stored base tensor, for specs that ``needs_base``

    def __call__(self, key: str) -> Tensor:
        return self.read_tensor(key).to(device=self.device, dtype=self.dtype)

    def vector(self, key: str) -> Tensor:
        return self(key).reshape(-1)

    def factor(self, factor: Factor) -> Tensor:
        return factor.build(self.read_tensor, device=self.device, dtype=self.dtype)


@dataclass(frozen=True)
class Spec(ABC):
    """What every spec is: the module and its tensor that the spec changes, loaded into a row op at merge time.

    A spec adds its adapter keys and scalars as fields and forms its row op from a ``Reader`` (``row_op``);
    ``summary``, formatted with its fields, says what it is in a few words for the report (``describe``).
    """

    summary: ClassVar[str] = ""
    module: str
    tensor: str

    def load(
        self,
        read_tensor: ReadTensor,
        *,
        device=None,
        dtype: torch.dtype = torch.float64,
        read_base: Callable[[], Tensor] | None = None,
    ) -> RowOp:
        return self.row_op(Reader(read_tensor, device, dtype, read_base))

    @abstractmethod
    def row_op(self, read: Reader) -> RowOp: ...

    def describe(self) -> str:
        return self.summary.format_map(vars(self))


_SpecClass = TypeVar("_SpecClass", bound="type[Spec]")


@dataclass_transform(frozen_default=True)
def spec_class(summary: str = "") -> Callable[[_SpecClass], _SpecClass]:
    """Make a ``Spec`` subclass a frozen dataclass (plain, picklable data) that describes itself as
    ``summary`` formatted with its fields ("hira r={rank}"); without one the class writes its own ``describe``."""

    def make(cls: _SpecClass) -> _SpecClass:
        if summary:
            cls.summary = summary
        return dataclass(frozen=True)(cls)

    return make


@spec_class("{label}")
class LowRankSpec(Spec):
    """tensor += scale * left @ right in the stored orientation."""

    left: Factor
    right: Factor
    scale: float
    label: str

    def row_op(self, read: Reader) -> RowOp:
        return LowRankRows(read.factor(self.left), read.factor(self.right), self.scale)


@spec_class()
class ScaleSpec(Spec):
    """IA3: the stored rows (axis 0) or columns (axis 1) are multiplied by the adapter's vector."""

    key: str
    axis: int
    label: str = "ia3"

    def row_op(self, read: Reader) -> RowOp:
        return RowScale(read.vector(self.key)) if self.axis == 0 else ColumnScale(read.vector(self.key))

    def describe(self) -> str:
        return f"{self.label} ({'rows' if self.axis == 0 else 'columns'})"


@spec_class("{label}")
class AddSpec(Spec):
    """tensor += scale * vector (LoRA's lora_bias on the layer's bias)."""

    key: str
    scale: float
    label: str = "lora bias"

    def row_op(self, read: Reader) -> RowOp:
        return RowAdd(read.vector(self.key), self.scale)


@spec_class()
class ReplaceRowsSpec(Spec):
    """Trainable tokens: the rows ``indices`` of the stored tensor take the adapter's values."""

    key: str
    indices: tuple[int, ...]

    def row_op(self, read: Reader) -> RowOp:
        return RowReplace(torch.tensor(self.indices, dtype=torch.long, device=read.device), read(self.key))

    def describe(self) -> str:
        return f"trainable tokens ({len(self.indices)} rows)"


@spec_class("ln tuning (replaced)")
class ReplaceSpec(Spec):
    """LN tuning: the tensor is replaced by the trained copy saved in the adapter."""

    key: str

    def row_op(self, read: Reader) -> RowOp:
        return CopyRows(read(self.key))


def needs_base(spec: Spec) -> bool:
    """Whether ``spec.load`` needs ``read_base`` (the whole base tensor), as KaSA's SVD truncation does."""
    return bool(getattr(spec, "needs_base", False))
