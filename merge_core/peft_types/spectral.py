"""FourierFT: the delta is the real part of a 2-D inverse FFT of a sparse spectrum, formed here row by row.

ifft2(D)[p, q] = 1/(M N) sum_k S_k exp(2 pi i (u_k p / M + v_k q / N)) for the n spectral entries (u_k, v_k).
Rows [a, b) need only the n phases of those rows, gathered into a (rows, N) spectrum and one 1-D inverse FFT
per row. PEFT computes its dense ifft2 in float32 (complex64), so it agrees with this float64 value to float32
rounding, not to float64's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .common import AdapterContext, ModuleInput, linear_features, mismatch, number, require
from .ops import RowOp
from .specs import Reader, Spec, spec_class

FOURIERFT_TOKENS = ("fourierft_spectrum",)


@dataclass
class SparseSpectrumRows:
    """block += Re(ifft2(D))[a:b] for D zero but for ``values`` at (row_freq, col_freq)."""

    row_freq: Tensor  # (n,) frequency along the stored rows
    col_freq: Tensor  # (n,) frequency along the stored columns
    values: Tensor  # (n,) complex, the scale already applied
    n_rows: int

    def apply_(self, block: Tensor, row_start: int) -> Tensor:
        rows = torch.arange(row_start, row_start + block.shape[0], device=block.device, dtype=torch.long)
        # The phase p * u / M reduced modulo M in integers first: the angle stays below 2 pi, exact to float64.
        turns = torch.outer(rows, self.row_freq.to(torch.long)) % self.n_rows
        angle = turns.to(torch.float64) * (2 * math.pi / self.n_rows)
        phased = torch.polar(torch.ones_like(angle), angle) * self.values
        spectrum = torch.zeros(block.shape[0], block.shape[1], dtype=phased.dtype, device=block.device)
        spectrum.index_add_(1, self.col_freq, phased)
        block.add_(torch.fft.ifft(spectrum, dim=1).real.to(block.dtype), alpha=1.0 / self.n_rows)
        return block


@spec_class("fourierft scaling={scale:g}")
class FourierSpec(Spec):
    """FourierFT's spectrum on the (out, in) delta, its entry locations drawn from ``seed`` as PEFT draws them."""

    key: str
    seed: int
    out_features: int
    in_features: int
    scale: float
    transposed: bool  # stored (in, out): the delta's transpose

    def row_op(self, read: Reader) -> RowOp:
        spectrum = read.vector(self.key)
        generator = torch.Generator().manual_seed(self.seed)
        flat = torch.randperm(self.out_features * self.in_features, generator=generator)[: spectrum.numel()]
        u, v = (flat // self.in_features).to(read.device), (flat % self.in_features).to(read.device)
        values = (spectrum * self.scale).to(torch.complex128)
        if self.transposed:
            return SparseSpectrumRows(v, u, values, self.in_features)
        return SparseSpectrumRows(u, v, values, self.out_features)


def fourierft_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    import re

    out_f, in_f = linear_features("FOURIERFT", module)
    (key,) = require(module.name, module.keys, "fourierft_spectrum")
    config = context.config
    n = number(config, "n_frequency", 1000, kind=int)
    pattern = config.get("n_frequency_pattern") or {}
    # PEFT's own lookup for FourierFT: the first pattern key matching the end of the module name.
    match = next((k for k in pattern if re.match(rf".*\.{k}$", module.name)), None)
    n = int(pattern[match]) if match is not None else n
    saved = math.prod(context.shapes[key])
    if saved != n or n > out_f * in_f:
        raise mismatch(
            module.name,
            f"the FourierFT spectrum has {saved} entries; the config says {n} for a {in_f} -> {out_f} layer",
        )
    seed = number(config, "random_loc_seed", 777, kind=int)
    scale = number(config, "scaling", 150.0)
    return [FourierSpec(module.name, "weight", key, seed, out_f, in_f, scale, module.stored_transposed)]
