"""Dequantize one row block of a quantized weight, exactly as its own library does for the whole tensor.

bitsandbytes quantizes the flattened weight in blocks of ``blocksize`` values, each with one absmax
(itself 8-bit quantized in blocks of 256 under double quantization). A row block [a, b) is the flat
range [a*cols, b*cols): we read the quantization blocks that cover it (packed bytes and absmax
travel together), decode them with bitsandbytes' own kernels as a 1-D tensor, and cut the rows
out. Every value depends only on its byte and its block's absmax, so the result is bit-for-bit
what ``bitsandbytes.functional.dequantize_4bit`` gives for the whole tensor (tests prove it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..checkpoint import BaseTensor
from ..safetensors_io import OpenFiles, element_size, read_rows
from .types import QuantizedTensor, QuantKind, RowReader


def checkpoint_reader(tensors: Mapping[str, BaseTensor], files: OpenFiles) -> RowReader:
    """A RowReader over a local checkpoint's tensors (BaseCheckpoint.tensors) through open shard files."""

    def read(name: str, start: int, stop: int | None) -> torch.Tensor:
        t = tensors[name]
        if stop is None:
            stop = t.info.shape[0] if t.info.shape else 1
        return read_rows(files.get(t.shard), t.info, start, stop)

    return read


def dequantize_rows(tensor: QuantizedTensor, read: RowReader, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the logical weight, dequantized, as float32 (exact, whatever it was rounded to).

    bitsandbytes 4-bit gives ``dequantize_4bit(W, state)``: code times absmax in float32, rounded to
    the quant state's dtype (the weight's dtype when it was quantized, e.g. bfloat16). That rounded
    value is the weight transformers' ``dequantize()`` and PEFT's 4-bit merge start from, and the one
    QLoRA trained on (``MatMul4Bit``: ``dequantize_4bit(B, state).to(A.dtype)``). 8-bit is float32
    (``int8_vectorwise_dequant``); FP8 is float32 in transformers' Fp8Dequantize before its final
    cast. The values are exact in float64, so the executor adds the delta there and rounds once.
    Memory: one row block plus at most one quantization block on each side.
    """
    if tensor.shape is None:
        raise ValueError(f"{tensor.name}: call resolve_shapes before dequantizing")
    rows = tensor.shape[0]
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"{tensor.name}: row range [{start}, {stop}) outside [0, {rows})")
    if tensor.kind is QuantKind.BNB_4BIT:
        return _rows_4bit(tensor, read, start, stop)
    if tensor.kind is QuantKind.BNB_8BIT:
        return _rows_8bit(tensor, read, start, stop)
    return _rows_fp8(tensor, read, start, stop)


def dequantize_tensor(tensor: QuantizedTensor, read: RowReader) -> torch.Tensor:
    """The whole logical weight (verification and tests; the merge goes row block by row block)."""
    assert tensor.shape is not None
    return dequantize_rows(tensor, read, 0, tensor.shape[0])


# --- bitsandbytes 4-bit ----------------------------------------------------------------------------


def _rows_4bit(t: QuantizedTensor, read: RowReader, start: int, stop: int) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    assert t.bnb4 is not None and t.shape is not None
    cols, bs = t.shape[1], t.bnb4.blocksize
    numel = math.prod(t.shape)
    first, last = start * cols, stop * cols
    k0, k1 = first // bs, -(-last // bs)  # quantization blocks covering the rows
    c0, c1 = k0 * bs, min(k1 * bs, numel)
    if last == first:
        return torch.empty((0, cols), dtype=torch.float32)
    packed = _packed_bytes(t, read, c0 // 2, (c1 + 1) // 2)
    state = bnbf.QuantState(
        absmax=_absmax(t, read, k0, k1),
        shape=torch.Size([c1 - c0]),
        blocksize=bs,
        quant_type=t.bnb4.quant_type,
        dtype=t.bnb4.dtype,  # the default output dtype of dequantize_4bit: the state's, not float32
    )
    flat = bnbf.dequantize_4bit(packed.reshape(-1, 1), state).reshape(-1)
    return flat[first - c0 : last - c0].reshape(stop - start, cols).to(torch.float32)


def _packed_bytes(t: QuantizedTensor, read: RowReader, b0: int, b1: int) -> torch.Tensor:
    """Bytes [b0, b1) of the packed 4-bit data, whatever bnb_4bit_quant_storage dtype holds them."""
    row_bytes = element_size(t.stored_dtype) * math.prod(t.stored_shape[1:])
    r0, r1 = b0 // row_bytes, -(-b1 // row_bytes)
    raw = read(t.data, r0, r1).contiguous().view(torch.uint8).reshape(-1)
    return raw[b0 - r0 * row_bytes : b1 - r0 * row_bytes]


def _absmax(t: QuantizedTensor, read: RowReader, k0: int, k1: int) -> torch.Tensor:
    """float32 absmax of 4-bit blocks [k0, k1), decoding the nested 8-bit level as dequantize_4bit does."""
    import bitsandbytes.functional as bnbf

    st = t.bnb4
    assert st is not None and t.shape is not None
    if not st.nested:
        return read(t.parts["absmax"], k0, k1).to(torch.float32)
    assert st.nested_blocksize is not None and st.nested_offset is not None
    nbs = st.nested_blocksize
    blocks = -(-math.prod(t.shape) // st.blocksize)
    j0, j1 = k0 // nbs, -(-k1 // nbs)
    nested = bnbf.QuantState(
        absmax=read(t.parts["nested_absmax"], j0, j1),
        blocksize=nbs,
        code=read(t.parts["nested_quant_map"], 0, None),
        dtype=st.nested_dtype or torch.float32,
    )
    absmax = bnbf.dequantize_blockwise(read(t.parts["absmax"], j0 * nbs, min(j1 * nbs, blocks)), nested)
    # Same float32 scalar and in-place add as QuantState.from_dict + dequantize_4bit.
    absmax += torch.tensor(float(st.nested_offset))
    if absmax.dtype != torch.float32:
        absmax = absmax.float()
    return absmax[k0 - j0 * nbs : k1 - j0 * nbs]


# --- bitsandbytes 8-bit and FP8 ------------------------------------------------------------------


def _rows_8bit(t: QuantizedTensor, read: RowReader, start: int, stop: int) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    codes = read(t.data, start, stop)
    scb = read(t.parts["scb"], start, stop).to(torch.float32)
    # int8 * SCB / 127, as transformers' and PEFT's dequantize_bnb_weight compute it.
    return bnbf.int8_vectorwise_dequant(codes, scb)


def _rows_fp8(t: QuantizedTensor, read: RowReader, start: int, stop: int) -> torch.Tensor:
    """float8 codes times their scale in float32: transformers' Fp8Dequantize before its final cast."""
    out = read(t.data, start, stop).to(torch.float32)
    scale_name = t.parts["scale_inv"]
    if t.block is None:
        return out.mul_(read(scale_name, 0, None).to(torch.float32).reshape(()))
    bm, bn = t.block
    s0, s1 = start // bm, -(-stop // bm)
    scales = read(scale_name, s0, s1).to(torch.float32)
    scales = scales.repeat_interleave(bm, dim=0)[start - s0 * bm : stop - s0 * bm]
    # Broadcast over the columns of each block through a view, so no second weight-sized tensor exists.
    full, rem = divmod(out.shape[1], bn)
    out[:, : full * bn].unflatten(-1, (full, bn)).mul_(scales[:, :full, None])
    if rem:
        out[:, full * bn :].mul_(scales[:, full:])
    return out
