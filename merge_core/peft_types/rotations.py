"""OFT and BOFT: orthogonal rotations of the input features, W' = W @ R^T (BOFT also rescales output rows)."""

from __future__ import annotations

import math

from .common import AdapterContext, ModuleInput, linear_only, mismatch, peft_config, refuse, require, require_matrix
from .orthogonal import BoftSpec, HraSpec, OftSpec
from .specs import ScaleSpec, Spec

OFT_TOKENS = ("oft_R", "oft_embedding_R", "oft_r", "oft_s")
BOFT_TOKENS = ("boft_R", "boft_s")
HRA_TOKENS = ("hra_u",)


def _block_size(n_elements: int) -> int:
    size = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return size if size * (size - 1) // 2 == n_elements else 0


def oft_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    if "oft_r" in module.keys or "oft_s" in module.keys:
        raise refuse("OFT", module.name, "uses the older OFT layout (oft_r/oft_s) that PEFT 0.21 no longer loads")
    embedding = "oft_embedding_R" in module.keys
    _, in_f = require_matrix("OFT", module) if embedding else linear_only("OFT", module)
    (key,) = require(module.name, module.keys, "oft_embedding_R" if embedding else "oft_R")
    shape = tuple(context.shapes[key])
    size = _block_size(shape[-1]) if len(shape) == 2 else 0
    if not size:
        raise mismatch(module.name, f"the OFT parameter has shape {list(shape)}, not (blocks, size * (size - 1) / 2)")
    config = peft_config("OFT", context.config)
    n_blocks = in_f // size if config.block_share else shape[0]
    if n_blocks * size != in_f or (config.block_share and shape[0] != 1):
        raise mismatch(
            module.name, f"{shape[0]} OFT block(s) of size {size} do not cover the layer's {in_f} input features"
        )
    return [
        OftSpec(
            module.name,
            "weight",
            key,
            size,
            n_blocks,
            bool(config.coft),
            float(config.eps),
            bool(config.block_share),
            bool(config.use_cayley_neumann),
            int(config.num_cayley_neumann_terms),
            transpose=not embedding,
        )
    ]


def boft_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    out_f, in_f = linear_only("BOFT", module)
    rot, scale = require(module.name, module.keys, "boft_R", "boft_s")
    shape, s_shape = tuple(context.shapes[rot]), tuple(context.shapes[scale])
    if len(shape) != 4 or shape[2] != shape[3] or shape[1] * shape[2] != in_f:
        raise mismatch(
            module.name, f"the BOFT rotation has shape {list(shape)}, which does not cover {in_f} input features"
        )
    if s_shape not in ((out_f, 1), (out_f,)):
        raise mismatch(module.name, f"boft_s has shape {list(s_shape)}, expected [{out_f}, 1]")
    if shape[0] > 1 and (shape[1] % (2 ** (shape[0] - 1)) or shape[2] % 2):
        raise mismatch(module.name, f"{shape[0]} butterfly factors do not fit {shape[1]} blocks of size {shape[2]}")
    return [
        BoftSpec(module.name, "weight", rot, shape[2], shape[1], shape[0]),
        ScaleSpec(module.name, "weight", scale, 0, "boft scale"),
    ]


def hra_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """W @ H, H the product of the r Householder reflections of hra_u's columns (Gram-Schmidt first with apply_GS)."""
    _, in_f = linear_only("HRA", module)
    (key,) = require(module.name, module.keys, "hra_u")
    shape = tuple(context.shapes[key])
    if len(shape) != 2 or shape[0] != in_f:
        raise mismatch(module.name, f"hra_u has shape {list(shape)}, expected [{in_f}, r]")
    config = peft_config("HRA", context.config)
    return [HraSpec(module.name, "weight", key, bool(config.apply_GS))]
