"""What a user may choose about a merge, validated once, with one sentence per bad value."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidOptionError

OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
# A shard larger than this is no shard at all; beyond it sizes are typos (1e400GB).
_MAX_SHARD_BYTES = 1 << 50
_DTYPE_NAMES = {**{v: k for k, v in OUTPUT_DTYPES.items()}, "F64": "float64"}
_SIZE_UNITS = {
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "B": 1,
}


def dtype_name(st_dtype: str) -> str:
    """'BF16' -> 'bfloat16': the name transformers and users know."""
    return _DTYPE_NAMES.get(st_dtype, st_dtype)


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1234 -> 1234 (the Hub's conventions)."""
    text = str(value).strip().upper().replace(" ", "")
    number, factor = text, 1
    for unit, unit_factor in _SIZE_UNITS.items():
        if text.endswith(unit):
            number, factor = text[: -len(unit)], unit_factor
            break
    try:
        size = float(number) * factor
    except ValueError:
        raise InvalidOptionError(f"Cannot read the size {value!r}; write it like 5GB, 500MB or 2GiB.") from None
    if not math.isfinite(size) or size < 1 or size > _MAX_SHARD_BYTES:
        raise InvalidOptionError(
            f"The shard size {value!r} is out of range; use a size like 5GB (between 1B and 1PiB)."
        )
    return int(size)


def check_device(device: str) -> str:
    """'cpu' or an available CUDA device; anything else is refused before any work."""
    text = str(device or "cpu").strip().lower()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise InvalidOptionError(f"Unknown device {device!r}; use cpu or cuda.") from None
    if parsed.type == "cpu":
        return text
    if parsed.type != "cuda":
        raise InvalidOptionError(f"The merge cannot run on device {device!r}; use cpu or cuda.")
    if not torch.cuda.is_available():
        raise InvalidOptionError(
            f"Device {device!r} was asked for, but this torch has no usable CUDA GPU; use --device cpu."
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InvalidOptionError(f"There is no {device}; this machine has {torch.cuda.device_count()} GPU(s).")
    return text


@dataclass
class MergeOptions:
    dtype: str = "auto"  # "auto" keeps the base's dtype
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES
    compute_dtype: str = "float64"
    device: str = "cpu"
    base_name: str | None = None  # Hub ID or path as the user typed it
    adapter_name: str | None = None
    adapter_revision: str | None = None

    def __post_init__(self) -> None:
        if self.dtype in (None, ""):
            self.dtype = "auto"
        if self.dtype != "auto" and self.dtype not in OUTPUT_DTYPES:
            raise InvalidOptionError(f"Unknown output dtype {self.dtype!r}; choose auto, {', '.join(OUTPUT_DTYPES)}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InvalidOptionError(f"Unknown compute dtype {self.compute_dtype!r}; choose float64 or float32.")
        self.max_shard_size = parse_size(self.max_shard_size)
        self.device = check_device(self.device)
