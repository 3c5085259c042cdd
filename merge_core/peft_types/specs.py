"""Plan-time specs: plain, picklable records of adapter tensor keys and scalars, loaded into row ops at merge time.

Every spec names the tensor of its module it changes (``tensor``: "weight", "bias", or a parameter name for
LoRA's ``target_parameters``), loads the adapter tensors it needs through ``read_tensor`` widened to the
compute dtype, and says in a few words what it is (``describe``) for the report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


def fmt_number(x: float) -> str:
    return f"{x:g}"


class TensorLoader:
    """Mixin of the specs: an adapter tensor read and widened to the compute dtype on the compute device."""

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
class LowRankSpec(TensorLoader):
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
class ScaleSpec(TensorLoader):
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
class AddSpec(TensorLoader):
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
class ReplaceRowsSpec(TensorLoader):
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
class ReplaceSpec(TensorLoader):
    """LN tuning: the tensor is replaced by the trained copy saved in the adapter."""

    module: str
    tensor: str
    key: str

    def load(self, read_tensor: ReadTensor, *, device=None, dtype=torch.float64) -> RowOp:
        return CopyRows(self._read(read_tensor, self.key, device, dtype))

    def describe(self) -> str:
        return "ln tuning (replaced)"


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
