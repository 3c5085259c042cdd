"""The merge arithmetic on row blocks: W' = W + sum(scale * L @ R), DoRA rescaling, rounding once.

Everything is computed in ``compute_dtype`` (float64 by default, so rounding to a 16-bit
output happens exactly once and matches a float64 reference bit for bit) and only the
final result is cast to the output dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# Row blocks of about this many elements keep the float64 working set near 64 MiB (accelerators,
# where larger blocks amortise transfers and launches; and the verification).
DEFAULT_BLOCK_ELEMENTS = 8 * 1024 * 1024
# On a CPU the merge's blocks are 8x smaller, so the float64 block (8 MiB) stays in the caches between
# its widening, the addmm and the rounding: 0.94 ns per element instead of 1.6-3.3 ns at 8M elements
# (one thread, a 410 x 2560 block, rank 16; benchmarks/RESULTS.md).
CPU_BLOCK_ELEMENTS = 1 << 20


def block_elements_for(device: torch.device) -> int:
    return CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEFAULT_BLOCK_ELEMENTS


def as_matrix(block: torch.Tensor) -> torch.Tensor:
    """``block`` as (rows, everything else); a view, so in-place updates land in the block.

    A convolution's weight (out, in, *kernel) and its LoRA factors, lora_A (r, in, *kernel) and lora_B
    (out, r, 1, ...), are the matrices PEFT multiplies in this view: delta = (B @ A).reshape(weight shape).
    """
    return block.view(block.shape[0] if block.dim() else 1, -1) if block.dim() != 2 else block


@dataclass
class LoadedDelta:
    left: torch.Tensor  # (rows, r); a convolution's lora_B (rows, r, 1, ...) is viewed as its matrix
    right: torch.Tensor  # (r, cols); a convolution's lora_A (r, in, *kernel) as (r, in * kernel)
    scale: float

    def __post_init__(self) -> None:
        self.left, self.right = as_matrix(self.left), as_matrix(self.right)

    def add_rows_to(self, block: torch.Tensor, start: int) -> torch.Tensor:
        """block += delta rows, in place and fused (addmm_): the delta is never materialised."""
        as_matrix(block).addmm_(self.left[start : start + block.shape[0]], self.right, alpha=self.scale)
        return block


def rows_per_block(shape: tuple[int, ...], block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    row = 1
    for d in shape[1:]:
        row *= d
    return max(1, block_elements // max(1, row))


def row_blocks(n_rows: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def dora_row_factor(exact_rows: torch.Tensor, magnitude_rows: torch.Tensor) -> torch.Tensor:
    """DoRA for Linear and convolutions: each output row (channel) is rescaled to the trained magnitude."""
    factor = magnitude_rows / torch.linalg.vector_norm(as_matrix(exact_rows), dim=1)
    return factor.view(-1, *([1] * (exact_rows.dim() - 1)))


@dataclass
class ColumnNorms:
    """Two-pass DoRA (Embedding, Conv1D): column norms of W + delta over all rows first."""

    sq: torch.Tensor | None = None
    count: int = field(default=0)

    def add(self, exact_rows: torch.Tensor) -> None:
        part = exact_rows.square().sum(dim=0)
        self.sq = part if self.sq is None else self.sq + part
        self.count += exact_rows.shape[0]

    def factor(self, magnitude: torch.Tensor) -> torch.Tensor:
        assert self.sq is not None
        return (magnitude / self.sq.sqrt()).unsqueeze(0)


class Workspace:
    """Reusable flat buffers, grown on demand and handed out as views.

    Allocating a fresh 64 MiB float64 block per row block page-faults on every call; with
    reused buffers the float64 merge runs at about 1.2 ns per element on two cores,
    five times faster, and peak memory stays flat.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self._buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None
    ) -> torch.Tensor:
        device = device or self.device
        numel = 1
        for d in shape:
            numel *= d
        key = (name, dtype, str(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


def apply_deltas_(
    work: torch.Tensor,
    row_start: int,
    deltas: list[LoadedDelta],
    bias_deltas: list[tuple[torch.Tensor, float]] | None = None,
) -> torch.Tensor:
    """work += sum(scale * L[rows] @ R) (+ bias deltas), in place, in work's dtype."""
    rows = work.shape[0] if work.dim() else 1
    for delta in deltas:
        work = delta.add_rows_to(work, row_start)
    for vector, scale in bias_deltas or ():
        work.add_(vector[row_start : row_start + rows], alpha=scale)
    return work


# Per float dtype: the integer view, the mask that drops the sign bit, and the bits of +Inf.
# A value is Inf or NaN exactly when its unsigned bits reach those of +Inf.
_FLOAT_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}


def all_finite(values: torch.Tensor, workspace: Workspace) -> bool:
    """No Inf or NaN in ``values`` (contiguous), decided on the bits.

    An integer mask and max over the rounded output costs about an eighth of
    torch.isfinite/aminmax on 16-bit floats, which keeps the check near 2% of a merge.
    """
    if values.numel() == 0 or not values.is_floating_point():
        return True
    if values.dtype not in _FLOAT_BITS:  # float8 and other rare kinds: no bit rule here
        return bool(torch.isfinite(values.float()).all())  # torch has no float8 isfinite on the CPU
    int_dtype, mask, inf_bits = _FLOAT_BITS[values.dtype]
    bits = values.reshape(-1).view(int_dtype)
    scratch = workspace.get("finite", tuple(bits.shape), int_dtype, values.device)
    torch.bitwise_and(bits, mask, out=scratch)
    return int(scratch.max()) < inf_bits


def finite_state(values: torch.Tensor, workspace: Workspace) -> str:
    """ "finite", "inf" (a value overflowed) or "nan", decided on the bits like all_finite."""
    if all_finite(values, workspace):
        return "finite"
    int_dtype, _, inf_bits = _FLOAT_BITS[values.dtype]
    scratch = workspace.get("finite", (values.numel(),), int_dtype, values.device)
    return "nan" if int(scratch.max()) > inf_bits else "inf"
