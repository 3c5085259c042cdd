"""Rope scaling: written the way llama.cpp's converter writes it, or refused."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from merge_core.errors import GgufUnsupportedError
from merge_core.gguf_export.arch import ArchSpec, head_dim, rope_parameters


def rope_type(config: Any) -> str:
    rope = rope_parameters(config)
    return str(rope.get("rope_type") or rope.get("type") or "default").lower()


def check_rope(config: Any, spec: ArchSpec) -> str:
    """The rope scaling kind if llama.cpp can be told about it; refuses the others."""
    kind = rope_type(config)
    # llama.cpp reads the linear keys for every architecture (Gemma 3 4B+ ships with it)
    if kind in ("default", "linear") or (kind == "llama3" and spec.gguf_arch == "llama"):
        return kind
    raise GgufUnsupportedError(
        f"GGUF export cannot write rope scaling {kind!r} for {spec.model_type}; "
        "supported: linear (any architecture) and llama3 (Llama)."
    )


def rope_extra_tensors(writer: Any, config: Any, spec: ArchSpec) -> dict[str, np.ndarray]:
    """Write the rope scaling keys; return the extra tensors (``rope_freqs``) the scaling needs."""
    kind = check_rope(config, spec)
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
    if kind == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(config)}
    return {}


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Per-frequency divisors llama.cpp reads from ``rope_freqs`` (its converter's formula, in float32)."""
    rope = rope_parameters(config)
    dim = head_dim(config)
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
