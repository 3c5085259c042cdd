"""OFT, BOFT and HRA specs: rotations from their saved parameters, by PEFT's own parametrisation code.

Only the small (block_size x block_size) rotation blocks (or HRA's r vectors) are formed; the row ops apply
them segment by segment, so the (in x in) matrix PEFT builds for its merge never exists here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import ColumnRotation, ReflectRows, RowOp
from .specs import Reader, Spec, spec_class


def oft_blocks(spec: OftSpec, weight: Tensor) -> Tensor:
    """R's diagonal blocks (n_blocks, size, size), as OFTRotationModule.get_weight computes them."""
    from peft.tuners.oft.layer import OFTRotationModule

    module = OFTRotationModule(
        weight.shape[0],
        weight.shape[1],
        spec.block_size,
        spec.block_size * spec.n_blocks,
        coft=spec.coft,
        eps=spec.eps,
        block_share=spec.block_share,
        use_cayley_neumann=spec.use_cayley_neumann,
        num_cayley_neumann_terms=spec.num_cayley_neumann_terms,
    ).to(device=weight.device)
    with torch.no_grad():
        if spec.coft:
            weight = module._project_batch(weight, eps=spec.eps)
        rotation = module._cayley_batch(weight, spec.block_size, spec.use_cayley_neumann, spec.num_cayley_neumann_terms)
    if spec.block_share:
        rotation = rotation[:1].expand(spec.n_blocks, -1, -1)
    return rotation.contiguous()


def boft_factors(spec: BoftSpec, weight: Tensor) -> list[tuple[Tensor | None, Tensor]]:
    """The butterfly factors of W @ M^T in application order: (permutation or None, transposed blocks)."""
    from peft.tuners.boft.layer import BOFTLayer

    n, d, h, _ = weight.shape
    with torch.no_grad():
        # cayley_batch and block_butterfly_perm do not touch their instance.
        rotations = BOFTLayer.cayley_batch(None, weight.reshape(n * d, h, h)).reshape(n, d, h, h)  # type: ignore[arg-type]
    in_features = spec.block_size * spec.block_num
    factors: list[tuple[Tensor | None, Tensor]] = []
    for i in range(n):
        perm: Tensor | None = None
        if n > 1:
            perm = BOFTLayer.block_butterfly_perm(  # type: ignore[arg-type]
                None, in_features, int(spec.block_num / (2**i)), int(spec.block_size / 2), n - 1
            ).to(weight.device)
        factors.append((perm, rotations[i].transpose(1, 2).contiguous()))
    return factors


@spec_class()
class OftSpec(Spec):
    """OFT: the stored tensor times a block-diagonal rotation from the right (R^T for Linear, R for Embedding)."""

    key: str
    block_size: int
    n_blocks: int
    coft: bool
    eps: float
    block_share: bool
    use_cayley_neumann: bool
    num_cayley_neumann_terms: int
    transpose: bool  # Linear: block @ R^T; Embedding: block @ R

    def row_op(self, read: Reader) -> RowOp:
        blocks = oft_blocks(self, read(self.key))
        return ColumnRotation([(None, blocks.transpose(1, 2).contiguous() if self.transpose else blocks)])

    def describe(self) -> str:
        share = " shared" if self.block_share else ""
        return f"oft blocks={self.n_blocks}x{self.block_size}{share}" + (" coft" if self.coft else "")


@spec_class("boft blocks={block_num}x{block_size} butterfly={n_factors}")
class BoftSpec(Spec):
    """BOFT: the stored (out, in) weight times the butterfly rotation's transpose from the right."""

    key: str
    block_size: int
    block_num: int
    n_factors: int

    def row_op(self, read: Reader) -> RowOp:
        return ColumnRotation(boft_factors(self, read(self.key)))


@spec_class()
class HraSpec(Spec):
    """HRA: the stored (out, in) weight times r Householder reflections from the right."""

    key: str
    apply_gs: bool

    def row_op(self, read: Reader) -> RowOp:
        u = read(self.key)
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
