"""OFT and BOFT rotations from their saved parameters, by PEFT's own parametrisation code.

Only the small (block_size x block_size) rotation blocks are formed; the row ops apply them segment by
segment, so the (in x in) rotation matrix PEFT builds for its merge never exists here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .specs import BoftSpec, OftSpec


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
