"""What a quantized base is made of, as plain data: decided from metadata, used by plan and merge."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch

from ..safetensors_io import element_size

# read(name, start, stop) -> rows [start, stop) of a stored tensor along its first dimension, in its stored
# dtype; stop None means through the last row, and a 0-d tensor comes back whole. dequant.py builds one
# from open shard files (checkpoint_reader); the Hub preflight can answer it with HTTP range reads.
RowReader = Callable[[str, int, int | None], torch.Tensor]


class QuantKind(str, Enum):  # noqa: UP042 - StrEnum needs Python 3.11; Spaces default to 3.10
    BNB_4BIT = "bnb-4bit"
    BNB_8BIT = "bnb-8bit"
    FP8 = "fp8"


@dataclass(frozen=True)
class Bnb4bitState:
    """The non-tensor part of a bitsandbytes 4-bit QuantState (the packed JSON tensor)."""

    quant_type: str  # "nf4" | "fp4"
    blocksize: int
    dtype: torch.dtype  # the weight's dtype when it was quantized: dequantize_4bit's default output dtype
    nested_blocksize: int | None = None
    nested_offset: float | None = None
    nested_dtype: torch.dtype | None = None

    @property
    def nested(self) -> bool:
        return self.nested_blocksize is not None


@dataclass(frozen=True)
class QuantizedTensor:
    """One logical weight stored quantized, and the side tensors it is decoded from.

    ``name`` is the name the weight has in the base and keeps in the merged output;
    ``parts`` maps a role ("data", "absmax", "quant_map", "nested_absmax", "nested_quant_map",
    "quant_state", "scb", "weight_format", "scale_inv", "activation_scale") to a stored tensor.
    """

    name: str
    kind: QuantKind
    parts: dict[str, str]
    stored_dtype: str  # safetensors dtype string of the data tensor
    stored_shape: tuple[int, ...]
    shape: tuple[int, ...] | None = None  # logical [out, in]; None until a 4-bit state is read
    quant_type: str | None = None  # nf4 / fp4 (4-bit), e4m3 / e5m2 (fp8)
    bnb4: Bnb4bitState | None = None
    block: tuple[int, int] | None = None  # fp8 scale block [rows, cols]; None = one scale per tensor

    @property
    def data(self) -> str:
        return self.parts["data"]

    @property
    def side_tensors(self) -> set[str]:
        """Stored tensors that exist only to decode this weight: none of them reaches the output."""
        return {n for role, n in self.parts.items() if role != "data"}

    @property
    def resolved(self) -> bool:
        """Everything dequantization needs is known (a 4-bit shape from hints alone is not enough)."""
        return self.shape is not None and (self.kind is not QuantKind.BNB_4BIT or self.bnb4 is not None)

    def fits_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether this weight can be ``shape``: exact once resolved, from the stored byte count before.

        Lets a preflight that has only the headers check an adapter's LoRA shapes against 4-bit weights.
        """
        if self.shape is not None:
            return tuple(shape) == self.shape
        stored_bytes = math.prod(self.stored_shape) * element_size(self.stored_dtype)
        return self.kind is QuantKind.BNB_4BIT and stored_bytes == (math.prod(shape) + 1) // 2

    def row_alignment(self) -> int:
        """Smallest row count whose blocks start and end on quantization-block boundaries.

        Any row range is dequantized exactly; aligned ranges just read no partial block twice.
        """
        if self.shape is None:
            raise ValueError(f"{self.name}: the logical shape is not known yet")
        cols = math.prod(self.shape[1:])
        if self.kind is QuantKind.BNB_4BIT and self.bnb4 is not None:
            span = self.bnb4.blocksize * (self.bnb4.nested_blocksize or 1)
            return span // math.gcd(span, cols)
        if self.kind is QuantKind.FP8 and self.block is not None:
            return self.block[0]
        return 1


@dataclass(frozen=True)
class LogicalTensor:
    """A weight as the planner sees it: the float tensor the merged model will hold."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


_KIND_WORDS = {
    QuantKind.BNB_4BIT: "bitsandbytes 4-bit",
    QuantKind.BNB_8BIT: "bitsandbytes 8-bit (LLM.int8)",
    QuantKind.FP8: "FP8",
}


@dataclass(frozen=True)
class QuantizedBase:
    """Everything the plan needs to know about a quantized (or quantization-configured) base."""

    method: str  # quantization_config.quant_method, or what the tensors say ("bitsandbytes", "fp8")
    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)
    default_dtype: torch.dtype = torch.bfloat16  # the merged model's dtype unless the user chooses one
    dtype_source: str = "default"  # where default_dtype came from, in words
    quantization_config: dict[str, Any] = field(default_factory=dict)

    @property
    def config_only(self) -> bool:
        """A float checkpoint whose config merely carries a quantization_config."""
        return not self.tensors

    @property
    def auxiliary(self) -> set[str]:
        """Stored tensor names that disappear from the output (scales, absmax, quant states, ...)."""
        out: set[str] = set()
        for t in self.tensors.values():
            out |= t.side_tensors
        return out

    @property
    def resolved(self) -> bool:
        return all(t.resolved for t in self.tensors.values())

    def kinds(self) -> list[QuantKind]:
        return sorted({t.kind for t in self.tensors.values()}, key=lambda k: k.value)

    def with_tensors(self, tensors: dict[str, QuantizedTensor]) -> QuantizedBase:
        return replace(self, tensors=tensors)

    def describe(self) -> str:
        """The facts in plain words, for the app, the CLI and the model card."""
        if self.config_only:
            return (
                f"The base's config carries a {self.method or 'quantization'} quantization_config but its weights "
                "are plain floating point; the merged model's config leaves it out so it loads as a plain model."
            )
        formats = ", ".join(self._format_words(k) for k in self.kinds())
        return (
            f"The base is quantized: {formats}, {len(self.tensors)} weights. The merge dequantizes them exactly "
            f"as {self._reference_words()} does, adds the adapter, and writes a plain "
            f"{_dtype_name(self.default_dtype)} model ({self.dtype_source}) without quantization_config."
        )

    def facts(self) -> dict[str, Any]:
        """The same facts as plain JSON-able data, for the merge report and the model card."""
        states = {t.bnb4 for t in self.tensors.values() if t.bnb4 is not None}
        fp8_blocks = {t.block for t in self.tensors.values() if t.kind is QuantKind.FP8}
        return {
            "method": self.method,
            "formats": [k.value for k in self.kinds()],
            "quantized_weights": len(self.tensors),
            "quant_types": sorted({t.quant_type for t in self.tensors.values() if t.quant_type}),
            "double_quant": sorted({s.nested for s in states}),
            "blocksizes": sorted({s.blocksize for s in states}),
            "fp8_blocks": [list(b) if b else None for b in sorted(fp8_blocks, key=str)],
            "default_dtype": _dtype_name(self.default_dtype),
            "config_only": self.config_only,
        }

    def _format_words(self, kind: QuantKind) -> str:
        words = _KIND_WORDS[kind]
        members = [t for t in self.tensors.values() if t.kind is kind]
        if kind is QuantKind.BNB_4BIT:
            types = sorted({(t.quant_type or "?").upper() for t in members})
            words += " " + "/".join(types)
            states = [t.bnb4 for t in members if t.bnb4 is not None]
            if states:
                words += " with double quantization" if states[0].nested else " without double quantization"
                words += f" (blocks of {states[0].blocksize})"
        elif kind is QuantKind.FP8:
            blocks = sorted({t.block for t in members}, key=str)
            words += f" {members[0].quant_type or ''}".rstrip()
            words += " with " + " and ".join(
                f"{b[0]}x{b[1]} block scales" if b else "one scale per tensor" for b in blocks
            )
        return words

    def _reference_words(self) -> str:
        kinds = set(self.kinds())
        if kinds <= {QuantKind.FP8}:
            return "transformers"
        return "bitsandbytes"

    def logical_tensors(self, dtype: torch.dtype | None = None) -> list[LogicalTensor]:
        """Each quantized weight as the float tensor the output holds: name, [out, in], dtype."""
        out_dtype = dtype or self.default_dtype
        missing = [t.name for t in self.tensors.values() if t.shape is None]
        if missing:
            raise ValueError(f"read the 4-bit quant states first (resolve_shapes); e.g. {missing[0]} has no shape yet")
        return [LogicalTensor(t.name, t.shape, out_dtype) for t in self.tensors.values() if t.shape is not None]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
