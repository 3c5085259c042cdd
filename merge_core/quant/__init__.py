"""Quantized bases: detect them from metadata, dequantize them row block by row block, exactly.

Usage (plan time, then merge time)::

    qbase = detect_quantization(base.config, base.tensors)          # None for a plain float base
    # Hub preflight, headers only: qbase = with_shape_hints(qbase, config_shapes(base.config))
    if qbase is not None:
        qbase = resolve_shapes(qbase, checkpoint_reader(base.tensors, files))
        logical = qbase.logical_tensors(dtype)                         # what the output holds
        skip = qbase.auxiliary                                         # side tensors that vanish
        config = plain_config(base.config, dtype)                      # no quantization_config
    rows = dequantize_rows(qbase.tensors[name], read, a, b)            # exact, per row block
"""

from .dequant import checkpoint_reader, dequantize_rows, dequantize_tensor
from .detect import detect_quantization, plain_config, quantization_config, resolve_shapes
from .hints import config_shapes, with_shape_hints
from .requant import bnb_settings, requantize
from .types import Bnb4bitState, LogicalTensor, QuantizedBase, QuantizedTensor, QuantKind, RowReader

__all__ = [
    "Bnb4bitState",
    "LogicalTensor",
    "QuantKind",
    "QuantizedBase",
    "QuantizedTensor",
    "RowReader",
    "bnb_settings",
    "checkpoint_reader",
    "config_shapes",
    "dequantize_rows",
    "dequantize_tensor",
    "detect_quantization",
    "plain_config",
    "quantization_config",
    "requantize",
    "resolve_shapes",
    "with_shape_hints",
]
