"""The numerics rows' engine: each merged tensor against an independent float64 reference.

W + scale * orient(B @ A) (and the DoRA formula) is rebuilt from the plan's module rows and the raw
adapter tensors, compared element by element with what was written (bitwise share after one
rounding, relative error), and probed with random vectors without ever forming B @ A.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import torch

from .peft_types.ops import apply_all_
from .plan import MergePlan, ModulePlan, OutputTensorPlan
from .safetensors_io import OpenFiles, TensorInfo, read_rows
from .sources import start_rows
from .tensor_math import as_matrix, row_blocks, rows_per_block
from .verify_report import ModuleNumerics

PROBE_VECTORS = 4
# Which row ranges of a tensor a check reads, given (rows, rows per block): all of them unless told otherwise.
RowRanges = Callable[[int, int], Iterable[tuple[int, int]]]


def _load_ops(tensor: OutputTensorPlan, adapter, start) -> list:
    """The row ops of merge_core.peft_types for ``tensor``: the same formulas the merge applies (the
    independent check of these types is the function rows against PeftModel)."""
    if not tensor.ops:
        return []
    from .peft_types import load_ops

    n_rows = tensor.shape[0] if tensor.shape else 1
    return load_ops(tensor.ops, adapter.tensor, dtype=torch.float64, read_base=lambda: start(0, n_rows).double())


class _Reference:
    """W + scale * orient(B @ A) [+ DoRA], built from ModulePlans and raw adapter tensors."""

    def __init__(self, plan: MergePlan, tensor: OutputTensorPlan, modules: list[ModulePlan], files: OpenFiles):
        self.plan, self.t, self.files = plan, tensor, files
        adapter = plan.adapter
        self.terms = []
        self.magnitude: torch.Tensor | None = None
        self.dora_cols = False
        for m in modules:
            if m.kind == "replaced" or m.module not in adapter.lora_modules:
                continue  # a peft_types module: its update is in tensor.ops
            lm = adapter.lora_modules[m.module]
            a = as_matrix(adapter.tensor(lm.a).double())  # type: ignore[arg-type]
            b = as_matrix(adapter.tensor(lm.b).double())  # type: ignore[arg-type]
            transposed = m.kind == "embedding" or m.fan_in_fan_out
            self.terms.append((a, b, m.scale, transposed))
            if lm.magnitude is not None:
                self.magnitude = adapter.tensor(lm.magnitude).double().reshape(-1)
                self.dora_cols = transposed
        self.bias = [(adapter.tensor(k).double().reshape(-1), s) for k, s in tensor.bias_deltas]
        self._start = start_rows(tensor, base=plan.base, adapter=adapter, files=files)
        self.ops = _load_ops(tensor, adapter, self._start)

    def exact_rows(self, a: int, b: int, start: torch.Tensor) -> torch.Tensor:
        """Rows of W + deltas with every other PEFT type's update applied, in float64."""
        exact = start + self.delta_rows(a, b).view_as(start) if self.terms or self.bias else start.clone()
        return apply_all_(exact, a, self.ops) if self.ops else exact

    def start(self, a: int, b: int) -> torch.Tensor:
        return self.start_raw(a, b).double()

    def start_raw(self, a: int, b: int) -> torch.Tensor:
        """The starting rows as stored (base dtype; float32 when dequantized), for the "did it change" test."""
        return self._start(a, b)

    def delta_rows(self, a: int, b: int) -> torch.Tensor:
        out = None
        for lora_a, lora_b, scale, transposed in self.terms:
            rows = (lora_a[:, a:b].T @ lora_b.T) if transposed else (lora_b[a:b] @ lora_a)
            out = rows * scale if out is None else out + rows * scale
        for vector, scale in self.bias:
            rows = vector[a:b] * scale
            out = rows if out is None else out + rows
        return out if out is not None else torch.zeros(0)

    def probe_rows(self, a: int, b: int, start: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(W + delta)[a:b] @ x without forming B @ A: W x + scale * B (A x)."""
        y = start @ x
        for lora_a, lora_b, scale, transposed in self.terms:
            if transposed:  # rows of (B @ A).T = A.T @ B.T
                y = y + scale * (lora_a[:, a:b].T @ (lora_b.T @ x))
            else:
                y = y + scale * (lora_b[a:b] @ (lora_a @ x))
        for vector, scale in self.bias:
            y = y + (vector[a:b] * scale).unsqueeze(1)
        return y


@dataclass
class ChangedTensor:
    numerics: ModuleNumerics
    identical_to_start: bool  # bitwise equal to the base (only decided when the dtypes match)
    nonfinite: bool


def _column_factor(ref: _Reference, t: OutputTensorPlan, step: int) -> torch.Tensor | None:
    """DoRA on columns (Conv1D, Embedding): magnitude over the column norms of the whole merged tensor."""
    if ref.magnitude is None or not ref.dora_cols:
        return None
    sq = torch.zeros(t.shape[1], dtype=torch.float64)
    for a, b in row_blocks(t.shape[0], step):
        sq += ref.exact_rows(a, b, ref.start(a, b)).square().sum(0)
    return ref.magnitude / sq.sqrt()


def _bitwise_equal(written: torch.Tensor, expected: torch.Tensor) -> int:
    """How many elements of ``written`` have exactly the bits of ``expected``."""
    size = written.element_size()
    same = written.reshape(-1).view(torch.uint8).view(-1, size) == expected.reshape(-1).view(torch.uint8).view(-1, size)
    return int(same.all(dim=1).sum())


def verify_changed(
    plan: MergePlan,
    t: OutputTensorPlan,
    modules: list[ModulePlan],
    out_file: BinaryIO,
    out_info: TensorInfo,
    files: OpenFiles,
    block_elements: int,
    seed: int,
    rows: RowRanges = row_blocks,
) -> ChangedTensor:
    """One pass over a merged tensor's ``rows``: reference comparison, probes, unchanged test, NaN scan."""
    ref = _Reference(plan, t, modules, files)
    out_dtype, n_rows = out_info.torch_dtype, t.shape[0]
    step = rows_per_block(t.shape, block_elements)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t.shape[1], PROBE_VECTORS, generator=gen, dtype=torch.float64) if len(t.shape) == 2 else None

    col_factor = _column_factor(ref, t, step)

    equal = total = 0
    err_sq = ref_sq = probe_err_sq = probe_sq = 0.0
    comparable = t.base is not None and t.base.info.dtype == t.dtype
    identical, nonfinite = comparable, False
    for a, b in rows(n_rows, step):
        start_raw = ref.start_raw(a, b)
        start = start_raw.double()
        exact = ref.exact_rows(a, b, start)
        row_factor = None
        if ref.magnitude is not None and not ref.dora_cols:
            row_factor = (ref.magnitude[a:b] / torch.linalg.vector_norm(as_matrix(exact), dim=1)).unsqueeze(1)
            exact = (as_matrix(exact) * row_factor).view_as(exact)
        elif col_factor is not None:
            exact = exact * col_factor.unsqueeze(0)
        written = read_rows(out_file, out_info, a, b)
        if identical:
            identical = torch.equal(written.reshape(-1).view(torch.uint8), start_raw.reshape(-1).view(torch.uint8))
        nonfinite = nonfinite or not bool(torch.isfinite(written).all())
        equal += _bitwise_equal(written, exact.to(out_dtype))
        total += written.numel()
        w64 = written.double()
        err_sq += float((w64 - exact).square().sum())
        ref_sq += float(exact.square().sum())
        if x is not None:
            probe_x = x * col_factor.unsqueeze(1) if col_factor is not None else x
            y_ref = ref.probe_rows(a, b, start, probe_x) if not ref.ops else exact @ probe_x
            if row_factor is not None:
                y_ref = y_ref * row_factor
            y = w64 @ x
            probe_err_sq += float((y - y_ref).square().sum())
            probe_sq += float(y_ref.square().sum())
    variant = ",".join(sorted({m.variant for m in modules}))
    numerics = ModuleNumerics(
        tensor=t.name,
        variant=variant,
        bitwise_fraction=equal / total if total else 1.0,
        relative_error=math.sqrt(err_sq / ref_sq) if ref_sq else 0.0,
        probe_error=math.sqrt(probe_err_sq / probe_sq) if probe_sq else 0.0,
    )
    return ChangedTensor(numerics, identical, nonfinite)
