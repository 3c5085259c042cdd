"""Where an output tensor's starting rows come from: the base as stored, the base dequantized,
or the adapter's full copy. One rule, read by the merge and by the verification alike."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapter import AdapterWeights
from .checkpoint import BaseCheckpoint
from .plan_types import OutputTensorPlan
from .safetensors_io import OpenFiles, read_rows

Rows = Callable[[int, int], torch.Tensor]


def start_rows(
    t: OutputTensorPlan,
    *,
    base: BaseCheckpoint,
    adapter: AdapterWeights,
    files: OpenFiles,
    buffer: torch.Tensor | None = None,
) -> Rows:
    """rows(a, b): rows [a, b) of ``t``'s starting value (stored dtype, or float32 when dequantized)."""
    if t.adapter_key is not None:
        full = adapter.tensor(t.adapter_key)
        return lambda a, b: full[a:b] if t.shape else full
    assert t.base is not None
    if t.quantized is not None:
        from .quant import checkpoint_reader, dequantize_rows

        quantized, reader = t.quantized, checkpoint_reader(base.tensors, files)
        return lambda a, b: dequantize_rows(quantized, reader, a, b)
    f, info = files.get(t.base.shard), t.base.info
    return lambda a, b: read_rows(f, info, a, b, buffer)


def row_alignment(t: OutputTensorPlan) -> int:
    """Row blocks of a quantized tensor start on quantization-block boundaries (no block read twice)."""
    return t.quantized.row_alignment() if t.quantized is not None else 1
