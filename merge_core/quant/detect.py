"""Recognise a quantized base from config.json and the safetensors headers, before any weight moves.

bitsandbytes 4-bit, bitsandbytes 8-bit and FP8 with ``weight_scale_inv`` are dequantized exactly
(dequant.py); packed formats whose decoding we cannot prove equal to their library (GPTQ, AWQ,
HQQ, AQLM, ...) are refused in one sentence that names the format and the way out.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..errors import QuantizationStateError, UnsupportedQuantizationError
from ..safetensors_io import element_size
from .types import Bnb4bitState, QuantizedBase, QuantizedTensor, QuantKind, RowReader

HeaderEntry = Any  # (dtype, shape[, offsets]) tuple, or an object with .dtype/.shape (TensorInfo, BaseTensor)

_FLOAT = frozenset({"F64", "F32", "F16", "BF16"})
_FP8 = {"F8_E4M3": "e4m3", "F8_E5M2": "e5m2"}
_FP8_SCALE_NAMES = (".weight_scale_inv", ".qscale_weight", ".scale")
_BNB4_SUFFIX = ".quant_state.bitsandbytes__"
_BNB4_ROLES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

# quant_method -> the name users know it by. Anything quantized that we do not decode is refused.
_FORMAT_NAMES = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "aqlm": "AQLM",
    "vptq": "VPTQ",
    "quanto": "optimum-quanto",
    "eetq": "EETQ",
    "higgs": "HIGGS",
    "hqq": "HQQ",
    "compressed-tensors": "compressed-tensors (llm-compressor)",
    "fbgemm_fp8": "FBGEMM FP8",
    "torchao": "torchao",
    "gguf": "GGUF",
    "bitnet": "BitNet",
    "spqr": "SpQR",
    "quark": "Quark",
    "fp_quant": "FP-Quant",
    "auto-round": "AutoRound",
    "mxfp4": "MXFP4",
    "nvfp4": "NVFP4",
    "mxfp8": "MXFP8",
    "metal": "Metal",
    "fouroversix": "FourOverSix",
    "sinq": "SINQ",
    "exl2": "EXL2",
}
# Tensor names that only packed formats write; the last name component is compared.
_PACKED_MARKERS = {
    "qweight": "GPTQ or AWQ",
    "qzeros": "GPTQ or AWQ",
    "g_idx": "GPTQ",
    "W_q": "HQQ",
    "codes": "AQLM",
    "codebooks": "AQLM",
    "weight_packed": "compressed-tensors (llm-compressor)",
    "q_weight": "EXL2",
    "weight_scales": "EETQ",
}
_WAY_OUT = (
    "merge into the full-precision model it was made from instead (usually the base_model named on the "
    "quantized repo's model card), then quantize the merged model again if you need it quantized"
)


def _entry(value: HeaderEntry) -> tuple[str, tuple[int, ...]]:
    value = getattr(value, "info", value)
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return str(value.dtype), tuple(value.shape)
    return str(value[0]), tuple(value[1])


def quantization_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The quantization_config of a model config (top level, or a multimodal text_config)."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("quantization_config"), Mapping):
            return dict(cfg["quantization_config"])
    return {}


def detect_quantization(config: Mapping[str, Any], header: Mapping[str, HeaderEntry]) -> QuantizedBase | None:
    """What quantization the base uses, from config.json and the safetensors headers only.

    Args:
        config: the base's config.json.
        header: {stored tensor name: (dtype string, shape)} over all shards; TensorInfo or
            BaseTensor values are accepted too.

    Returns:
        None for a plain float base. Otherwise a QuantizedBase; its 4-bit weights have
        ``shape is None`` until ``resolve_shapes`` reads their (tiny) quant-state tensors.

    Raises:
        UnsupportedQuantizationError: a packed format we do not decode (GPTQ, AWQ, ...).
        QuantizationStateError: side tensors are missing or do not fit their weights.
    """
    entries = {name: _entry(v) for name, v in header.items()}
    qconfig = quantization_config(config)
    method = str(qconfig.get("quant_method", "")).lower()
    _refuse_packed(method, entries)
    tensors: dict[str, QuantizedTensor] = {}
    tensors.update(_bnb_4bit(entries))
    tensors.update(_bnb_8bit(entries))
    tensors.update(_fp8(entries, qconfig))
    _refuse_leftovers(method, entries, tensors)
    if not tensors and not qconfig:
        return None
    if not method:
        method = "fp8" if all(t.kind is QuantKind.FP8 for t in tensors.values()) else "bitsandbytes"
    dtype, source = _default_dtype(config, qconfig, tensors, entries)
    return QuantizedBase(
        method=method, tensors=tensors, default_dtype=dtype, dtype_source=source, quantization_config=qconfig
    )


def _refuse(fmt: str) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(
        f"The base model is quantized with {fmt}, whose packed weights this tool cannot dequantize exactly; {_WAY_OUT}."
    )


def _refuse_packed(method: str, entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    for name, (dtype, _shape) in entries.items():
        fmt = _PACKED_MARKERS.get(name.rsplit(".", 1)[-1])
        if fmt and dtype not in _FLOAT:
            raise _refuse(_FORMAT_NAMES.get(method, fmt))


def _refuse_leftovers(
    method: str, entries: Mapping[str, tuple[str, tuple[int, ...]]], tensors: Mapping[str, QuantizedTensor]
) -> None:
    """Quantized-looking weights that none of the decoders claimed: never let them pass as floats."""
    claimed = set(tensors)
    for t in tensors.values():
        claimed |= t.side_tensors
    for name, (dtype, _shape) in entries.items():
        if name in claimed or dtype in _FLOAT:
            continue
        if dtype in _FP8 or dtype == "F8_E8M0":
            raise _refuse(_FORMAT_NAMES.get(method, "an FP8 scheme without weight_scale_inv scales"))
        if not name.endswith(".weight"):
            continue  # integer buffers such as position_ids
        if method in _FORMAT_NAMES:
            raise _refuse(_FORMAT_NAMES[method])
        if method in ("bitsandbytes", "fp8") or tensors:
            raise QuantizationStateError(
                f"The quantized weight {name} ({dtype}) has no scale or quant state beside it, so it cannot be "
                "dequantized; the checkpoint is incomplete, download it again."
            )
        raise _refuse(f"an unrecognised scheme ({name} is stored as {dtype})")


def _bnb_4bit(entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, QuantizedTensor]:
    out: dict[str, QuantizedTensor] = {}
    for state_name in entries:
        if _BNB4_SUFFIX not in state_name:
            continue
        weight, quant_type = state_name.split(_BNB4_SUFFIX)
        if weight not in entries or quant_type not in ("nf4", "fp4"):
            raise QuantizationStateError(
                f"The bitsandbytes state {state_name} has no weight {weight} beside it (or an unknown type "
                f"{quant_type!r}); the checkpoint is incomplete, download it again."
            )
        parts = {"data": weight, "quant_state": state_name}
        parts.update({role: f"{weight}.{role}" for role in _BNB4_ROLES if f"{weight}.{role}" in entries})
        if "absmax" not in parts or ("nested_absmax" in parts) != ("nested_quant_map" in parts):
            raise QuantizationStateError(
                f"The bitsandbytes 4-bit weight {weight} lacks some of its absmax/nested tensors; the checkpoint "
                "is incomplete, download it again."
            )
        dtype, shape = entries[weight]
        out[weight] = QuantizedTensor(weight, QuantKind.BNB_4BIT, parts, dtype, shape, quant_type=quant_type)
    return out


def _bnb_8bit(entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, QuantizedTensor]:
    out: dict[str, QuantizedTensor] = {}
    for scb in entries:
        if not scb.endswith(".SCB"):
            continue
        module = scb[: -len(".SCB")].removesuffix(".weight")
        weight = f"{module}.weight"
        dtype, shape = entries.get(weight, ("", ()))
        if dtype != "I8" or len(shape) != 2 or entries[scb][1] != (shape[0],):
            raise QuantizationStateError(
                f"The bitsandbytes 8-bit scale {scb} does not fit an int8 weight {weight} of one row per scale; "
                "the checkpoint is broken, download it again."
            )
        parts = {"data": weight, "scb": scb}
        for fmt in (f"{module}.weight_format", f"{weight}.weight_format"):
            if fmt in entries:
                parts["weight_format"] = fmt
        out[weight] = QuantizedTensor(weight, QuantKind.BNB_8BIT, parts, dtype, shape, shape=shape)
    return out


def _fp8(entries: Mapping[str, tuple[str, tuple[int, ...]]], qconfig: Mapping[str, Any]) -> dict[str, QuantizedTensor]:
    out: dict[str, QuantizedTensor] = {}
    for weight, (dtype, shape) in entries.items():
        module = weight.removesuffix(".weight")
        # transformers renames `.qscale_weight` (Mistral Large) and `.scale` (DeepSeek V4) to weight_scale_inv.
        scale = next((module + s for s in _FP8_SCALE_NAMES if module + s in entries), None)
        if dtype not in _FP8 or not weight.endswith(".weight") or scale is None:
            continue
        scale_dtype, scale_shape = entries[scale]
        if len(shape) != 2 or scale_dtype not in _FLOAT:
            raise UnsupportedQuantizationError(
                f"The FP8 weight {weight} ({len(shape)}-D, scales {scale_dtype}) uses a layout this tool does not "
                f"dequantize; {_WAY_OUT}."
            )
        parts = {"data": weight, "scale_inv": scale}
        act = weight.removesuffix(".weight") + ".activation_scale"
        if act in entries:
            parts["activation_scale"] = act
        block = _fp8_block(weight, shape, scale_shape, qconfig.get("weight_block_size"))
        out[weight] = QuantizedTensor(
            weight, QuantKind.FP8, parts, dtype, shape, shape=shape, quant_type=_FP8[dtype], block=block
        )
    if out and str(qconfig.get("scale_fmt", "float")) != "float":
        raise _refuse(f"FP8 with {qconfig.get('scale_fmt')} scales")
    return out


def _fp8_block(
    weight: str, shape: tuple[int, ...], scale_shape: tuple[int, ...], configured: Any
) -> tuple[int, int] | None:
    """The [rows, cols] block one scale covers, as transformers' FineGrainedFP8 reads it; None = per tensor."""
    rows, cols = shape
    if math.prod(scale_shape) == 1:
        return None
    grid = tuple(scale_shape[-2:]) if len(scale_shape) >= 2 else ()
    if configured is not None and len(configured) == 2:
        block = (int(configured[0]), int(configured[1]))
    elif len(grid) == 2 and rows % grid[0] == 0 and cols % grid[1] == 0:
        block = (rows // grid[0], cols // grid[1])
    else:
        block = (0, 0)
    if block[0] <= 0 or block[1] <= 0 or grid != (-(-rows // block[0]), -(-cols // block[1])):
        raise QuantizationStateError(
            f"The FP8 scales of {weight} have shape {list(scale_shape)}, which does not tile a {rows}x{cols} weight "
            f"in blocks of {configured or 'any size'}; check weight_block_size in the quantization_config."
        )
    return block


def _default_dtype(
    config: Mapping[str, Any],
    qconfig: Mapping[str, Any],
    tensors: Mapping[str, QuantizedTensor],
    entries: Mapping[str, tuple[str, tuple[int, ...]]],
) -> tuple[torch.dtype, str]:
    """The dtype the base's weights are in: bnb 4-bit from its unquantized weights, others from the config.

    A bnb 4-bit checkpoint is saved from a model loaded in one dtype: its unquantized weights keep it and
    its 4-bit states record it, so dequantize_4bit returns it. bnb_4bit_compute_dtype only says what the
    matmuls run in; writing in it when it differs would round every unquantized weight (float16 ->
    bfloat16 drops 3 bits) or overflow them (bfloat16 -> float16). For a config-only base this is just
    the config's dtype: the planner's usual default applies there.
    """
    kinds = {t.kind for t in tensors.values()}
    if QuantKind.BNB_4BIT in kinds:
        stored = _stored_float_dtype(entries, tensors)
        if stored is not None:
            return stored, "the dtype of the base's unquantized weights, which its 4-bit weights dequantize to"
        dtype = _float_dtype(qconfig.get("bnb_4bit_compute_dtype"))
        if dtype is not None:
            return dtype, "the quantization config's bnb_4bit_compute_dtype"
    for key in ("dtype", "torch_dtype"):
        dtype = _float_dtype(config.get(key))
        if dtype is not None:
            return dtype, f"the base config's {key}"
    return torch.bfloat16, "bfloat16, as the config names no compute dtype"


_TORCH_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _stored_float_dtype(
    entries: Mapping[str, tuple[str, tuple[int, ...]]], tensors: Mapping[str, QuantizedTensor]
) -> torch.dtype | None:
    """The dtype holding most bytes of the weights stored as plain floats (not a quantized weight or its side)."""
    quantized = set(tensors)
    for t in tensors.values():
        quantized |= t.side_tensors
    totals: dict[str, int] = {}
    for name, (dtype, shape) in entries.items():
        if name not in quantized and dtype in _TORCH_FLOAT:
            totals[dtype] = totals.get(dtype, 0) + math.prod(shape) * element_size(dtype)
    return _TORCH_FLOAT[max(totals, key=totals.__getitem__)] if totals else None


def _float_dtype(value: Any) -> torch.dtype | None:
    if not isinstance(value, str):
        return None
    dtype = getattr(torch, value.removeprefix("torch."), None)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else None


def plain_config(config: Mapping[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The base config as a plain model's config: no quantization_config (top level or nested).

    With ``dtype``, the dtype keys the config already has (``dtype`` / ``torch_dtype``) name it.
    """
    out = copy.deepcopy(dict(config))
    for cfg in (out, *(v for v in out.values() if isinstance(v, dict))):
        cfg.pop("quantization_config", None)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["dtype"]
        for key in keys:
            out[key] = name
    return out


def resolve_shapes(qbase: QuantizedBase, read: RowReader) -> QuantizedBase:
    """Fill in what only the tiny state tensors know: 4-bit shapes/blocksizes and the 8-bit layout.

    ``read`` is a RowReader; it is asked for each 4-bit ``quant_state`` (a few hundred bytes of
    JSON) and each 8-bit ``weight_format`` (one byte), never for weights.
    """
    tensors = {}
    for name, t in qbase.tensors.items():
        if t.kind is QuantKind.BNB_4BIT and t.bnb4 is None:
            t = _resolve_4bit(t, _read_all(read, t.parts["quant_state"]))
        elif t.kind is QuantKind.BNB_8BIT and "weight_format" in t.parts:
            _check_8bit_format(t, _read_all(read, t.parts["weight_format"]))
        tensors[name] = t
    return qbase.with_tensors(tensors)


def _read_all(read: RowReader, name: str) -> torch.Tensor:
    return read(name, 0, None)


def _check_8bit_format(t: QuantizedTensor, value: torch.Tensor) -> None:
    if int(value.reshape(-1)[0]) != 0:
        raise UnsupportedQuantizationError(
            f"The bitsandbytes 8-bit weight {t.name} is stored in a GPU-specific tile layout (weight_format "
            f"{int(value.reshape(-1)[0])}) rather than row-major; {_WAY_OUT}."
        )


def _resolve_4bit(t: QuantizedTensor, packed_json: torch.Tensor) -> QuantizedTensor:
    """Read the packed quant-state JSON (as bitsandbytes' QuantState.from_dict does) and check the sizes."""
    try:
        state = json.loads(bytes(packed_json.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
        shape = tuple(int(d) for d in state["shape"])
        bnb4 = Bnb4bitState(
            quant_type=str(state["quant_type"]),
            blocksize=int(state["blocksize"]),
            dtype=getattr(torch, str(state["dtype"])),
            nested_blocksize=int(state["nested_blocksize"]) if "nested_blocksize" in state else None,
            nested_offset=float(state["nested_offset"]) if "nested_offset" in state else None,
            nested_dtype=getattr(torch, str(state["nested_dtype"])) if "nested_dtype" in state else None,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QuantizationStateError(
            f"The bitsandbytes quant state of {t.name} is unreadable ({exc}); the checkpoint is broken, "
            "download it again."
        ) from exc
    _check_4bit_sizes(t, shape, bnb4)
    return replace(t, shape=shape, bnb4=bnb4)


def _check_4bit_sizes(t: QuantizedTensor, shape: tuple[int, ...], bnb4: Bnb4bitState) -> None:
    numel = math.prod(shape)
    stored_bytes = math.prod(t.stored_shape) * element_size(t.stored_dtype)
    ok = (
        len(shape) == 2
        and bnb4.quant_type == t.quant_type
        and bnb4.blocksize > 0
        and bnb4.blocksize % 2 == 0
        and stored_bytes == (numel + 1) // 2
        and bnb4.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and (not bnb4.nested or (bnb4.nested_blocksize or 0) > 0)
    )
    if not ok:
        raise QuantizationStateError(
            f"The bitsandbytes 4-bit weight {t.name} ({list(t.stored_shape)} {t.stored_dtype}) does not match its "
            f"quant state (shape {list(shape)}, {bnb4.quant_type}, blocksize {bnb4.blocksize}); the checkpoint is "
            "broken, download it again."
        )
