"""The merge arithmetic on row blocks: W' = W + sum(scale * L @ R), DoRA rescaling, rounding once.

Everything is computed in ``compute_dtype`` (float64 by default, so rounding to a 16-bit
output happens exactly once and matches a float64 reference bit for bit) and only the
final result is cast to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

# Row blocks of about this many elements keep the float64 working set near 64 MiB.
DEFAULT_BLOCK_ELEMENTS = 8 * 1024 * 1024


@dataclass
class LoadedDelta:
    left: torch.Tensor  # (rows, r)
    right: torch.Tensor  # (r, cols)
    scale: float

    def rows(self, start: int, end: int) -> torch.Tensor:
        return (self.left[start:end] @ self.right) * self.scale


@dataclass
class BlockStats:
    """Norms accumulated while a tensor streams by (all in float64)."""

    weight_sq: float = 0.0  # ||W||^2 of the starting value
    delta_sq: float = 0.0  # ||W'_exact - W||^2
    applied_sq: float = 0.0  # ||round(W'_exact) - W||^2, what actually changed
    max_rounding_error: float = 0.0  # max |round(W'_exact) - W'_exact|
    nonfinite: int = 0

    def add(self, start: torch.Tensor, exact: torch.Tensor, rounded: torch.Tensor) -> None:
        start64 = start.to(torch.float64)
        exact64 = exact.to(torch.float64)
        rounded64 = rounded.to(torch.float64)
        self.weight_sq += float(start64.square().sum())
        self.delta_sq += float((exact64 - start64).square().sum())
        self.applied_sq += float((rounded64 - start64).square().sum())
        if rounded64.numel():
            finite = torch.isfinite(rounded64)
            self.nonfinite += int((~finite).sum())
            err = (rounded64 - exact64).abs()
            self.max_rounding_error = max(self.max_rounding_error, float(err[finite].max()) if finite.any() else 0.0)


def rows_per_block(shape: tuple[int, ...], block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    row = 1
    for d in shape[1:]:
        row *= d
    return max(1, block_elements // max(1, row))


def row_blocks(n_rows: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def exact_block(
    start_rows: torch.Tensor,
    row_start: int,
    deltas: list[LoadedDelta],
    compute_dtype: torch.dtype,
    bias_deltas: Optional[list[tuple[torch.Tensor, float]]] = None,
) -> torch.Tensor:
    """W[rows] + sum of deltas for those rows, in compute_dtype, before any DoRA rescaling."""
    block = start_rows.to(compute_dtype)
    row_end = row_start + block.shape[0] if block.dim() else 1
    for delta in deltas:
        block = block + delta.rows(row_start, row_end)
    for vector, scale in bias_deltas or ():
        block = block + vector[row_start:row_end] * scale
    return block


def dora_row_factor(exact_rows: torch.Tensor, magnitude_rows: torch.Tensor) -> torch.Tensor:
    """DoRA for Linear: each output row is rescaled to the trained magnitude."""
    return (magnitude_rows / torch.linalg.vector_norm(exact_rows, dim=1)).unsqueeze(1)


@dataclass
class ColumnNorms:
    """Two-pass DoRA (Embedding, Conv1D): column norms of W + delta over all rows first."""

    sq: Optional[torch.Tensor] = None
    count: int = field(default=0)

    def add(self, exact_rows: torch.Tensor) -> None:
        part = exact_rows.square().sum(dim=0)
        self.sq = part if self.sq is None else self.sq + part
        self.count += exact_rows.shape[0]

    def factor(self, magnitude: torch.Tensor) -> torch.Tensor:
        assert self.sq is not None
        return (magnitude / self.sq.sqrt()).unsqueeze(0)


ReadRows = Callable[[int, int], torch.Tensor]
