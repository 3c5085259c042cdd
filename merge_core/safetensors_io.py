"""Streaming reads and writes of the safetensors format, one tensor (or row block) at a time.

The ``safetensors`` package reads through mmap and writes whole dicts of tensors. We need
the opposite: write a shard whose header is known up front (all shapes come from the plan)
and then append tensor bytes as they are produced, so that peak memory stays at one row
block instead of one shard. The format is simple enough (8-byte little-endian header
length, JSON header, raw little-endian data) to do this here.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from .json_files import JsonFormatError, parse_json
from .output_file import open_output

if sys.byteorder != "little":  # pragma: no cover - every platform we ship on is little-endian
    raise ImportError("merge_core reads safetensors as raw little-endian bytes")

DTYPE_FROM_ST: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    # ue8m0 scales of some FP8 checkpoints: read so that detection can name the scheme it refuses.
    "F8_E8M0": torch.float8_e8m0fnu,
    # The rest of what safetensors' own torch loader reads (safetensors.torch._TYPES): copied bit for bit.
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
}
ST_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_ST.items()}
FLOAT_ST_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# Hard limit of the format's reference implementation; a larger header means a corrupt file.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFormatError(ValueError):
    """The file is not a valid safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_FROM_ST[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_ST_DTYPES


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


_ELEMENT_SIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPE_FROM_ST.items()}


def element_size(st_dtype: str) -> int:
    return _ELEMENT_SIZE[st_dtype]


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read only the JSON header of a safetensors file (a few KB, whatever the file size).

    Validated as the format's reference implementation does (safetensors' ``Metadata::validate``),
    which is what transformers and PEFT load with: a file they refuse is refused here too, and no
    offset can point into the header, past the end or into another tensor's bytes.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsFormatError(f"{path.name} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise SafetensorsFormatError(f"{path.name} has an implausible header size ({header_len} bytes)")
        try:
            header = parse_json(f.read(header_len))
        except JsonFormatError as exc:
            raise SafetensorsFormatError(f"{path.name} has a corrupt header: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path.name} has a corrupt header: it is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError(f"{path.name}: __metadata__ must map names to strings")
    data_start = 8 + header_len
    infos = sorted((_tensor_info(path, name, entry, data_start) for name, entry in header.items()), key=_offsets)
    end = data_start
    for info in infos:
        if info.begin != end:
            raise SafetensorsFormatError(f"{path.name}: tensor {info.name} has inconsistent offsets (overlap or gap)")
        end = info.end
    if end != file_size:
        why = "file truncated?" if end > file_size else "bytes no tensor describes"
        raise SafetensorsFormatError(
            f"{path.name}: its tensors cover {end - data_start} bytes of data but the file holds "
            f"{file_size - data_start} ({why})"
        )
    return SafetensorsHeader(path, {t.name: t for t in infos}, metadata)


def _offsets(info: TensorInfo) -> tuple[int, int]:
    return info.begin, info.end


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry, checked field by field: dtype known, shape and offsets non-negative integers."""
    if not isinstance(entry, dict):
        raise SafetensorsFormatError(f"{path.name}: the header entry of tensor {name} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_FROM_ST:
        raise SafetensorsFormatError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise SafetensorsFormatError(f"{path.name}: tensor {name} has an invalid shape {shape}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
        raise SafetensorsFormatError(f"{path.name}: tensor {name} has invalid data_offsets {offsets}")
    info = TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    if info.end < info.begin or info.numel * element_size(dtype) != info.nbytes:
        raise SafetensorsFormatError(f"{path.name}: tensor {name} has inconsistent offsets (file truncated?)")
    return info


def read_rows(
    f: BinaryIO, info: TensorInfo, row_start: int, row_end: int, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Read rows [row_start, row_end) of a tensor (the first dimension) without touching the rest.

    ``buffer`` (uint8, large enough) is reused instead of allocating: fresh multi-MB
    allocations page-fault on every block and cost more than the merge arithmetic.
    """
    if not info.shape:
        row_start, row_end = 0, 1
    row_numel = math.prod(info.shape[1:]) if info.shape else 1
    itemsize = element_size(info.dtype)
    offset = info.begin + row_start * row_numel * itemsize
    nbytes = (row_end - row_start) * row_numel * itemsize
    buf = buffer[:nbytes] if buffer is not None and buffer.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        _read_at(f, memoryview(buf.numpy()), offset, info.name)
    shape = (row_end - row_start, *info.shape[1:]) if info.shape else ()
    return buf.view(info.torch_dtype).reshape(shape)


def _read_at(f: BinaryIO, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` from ``offset``: positional reads (no seek), so the read-ahead thread, the writer
    thread and the merge thread may share one handle."""
    got, fd = 0, f.fileno()
    while got < len(view):
        rest = view[got:]
        n = os.preadv(fd, [rest], offset + got) if hasattr(os, "preadv") else _seek_read(f, rest, offset + got)
        if not n:
            raise SafetensorsFormatError(f"unexpected end of file while reading {name}")
        got += n


def _seek_read(f: BinaryIO, view: memoryview, offset: int) -> int:  # pragma: no cover - platforms without preadv
    f.seek(offset)
    return f.readinto(view) or 0


def read_tensor(path: str | os.PathLike[str], info: TensorInfo) -> torch.Tensor:
    with open(path, "rb") as f:
        return read_rows(f, info, 0, info.shape[0] if info.shape else 1)


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The raw little-endian bytes of a tensor as a flat uint8 CPU tensor (no copy when it is contiguous on the CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(-1).view(torch.uint8)


class OpenFiles:
    """Read handles kept open per path while a checkpoint streams by (merge and verification)."""

    def __init__(self) -> None:
        import threading

        self._open: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()  # the read-ahead thread opens files too

    def get(self, path: Path) -> BinaryIO:
        with self._lock:
            f = self._open.get(path)
            if f is None:
                f = self._open[path] = open(path, "rb")
            return f

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


class _ClosesOnSuccess:
    """`with` closes on success and aborts on an exception (which then propagates)."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


class StreamingWriter(_ClosesOnSuccess):
    """Writes one safetensors file whose tensors are declared up front.

    Tensors must be written in declaration order; each may arrive in several row blocks.
    ``close`` refuses to finish a file with missing bytes, so a bug can never produce a
    silently truncated shard.
    """

    def __init__(
        self, path: str | os.PathLike[str], tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None
    ):
        self.path = Path(path)
        self._tensors = list(tensors)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for t in self._tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        self._data_size = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        # The reference implementation pads the header to 8 bytes so the data is aligned.
        raw += b" " * (-len(raw) % 8)
        self._file = open_output(self.path)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._index = 0
        self._written_in_current = 0

    @property
    def current(self) -> PlannedTensor:
        return self._tensors[self._index]

    def _advance(self, nbytes: int) -> None:
        if self._index >= len(self._tensors):
            raise RuntimeError(f"{self.path.name}: more data written than declared")
        self._written_in_current += nbytes
        expected = self.current.nbytes
        if self._written_in_current > expected:
            raise RuntimeError(f"{self.path.name}: too much data for {self.current.name}")
        if self._written_in_current == expected:
            self._index += 1
            self._written_in_current = 0
            # Zero-size tensors take no bytes: step over them right away.
            while self._index < len(self._tensors) and self._tensors[self._index].nbytes == 0:
                self._index += 1

    def begin(self, name: str) -> None:
        """Assert that the next bytes belong to ``name``; catches ordering bugs early."""
        while (
            self._index < len(self._tensors)
            and self._tensors[self._index].nbytes == 0
            and self._tensors[self._index].name != name
        ):
            self._index += 1
        if self._index >= len(self._tensors) or self.current.name != name or self._written_in_current:
            got = self.current.name if self._index < len(self._tensors) else "<end>"
            raise RuntimeError(f"{self.path.name}: expected tensor {got}, got {name}")
        if self.current.nbytes == 0:
            self._index += 1

    def write(self, tensor: torch.Tensor, dtype: torch.dtype | None = None, *, check: Callable | None = None) -> None:
        """Append ``tensor``'s values, rounded to ``dtype`` (default: its own) by the file as it stores
        them; ``check`` sees every rounded piece before the piece can reach the disk's queue."""
        if dtype is not None and dtype != tensor.dtype:
            nbytes = tensor.numel() * element_size(ST_FROM_DTYPE[dtype])
            if nbytes:
                self._advance(nbytes)
                self._file.write_rounded(tensor.detach().reshape(-1), dtype, check)
            return
        data = flat_bytes(tensor)
        if check is not None:
            check(tensor)
        if data.numel() == 0:
            return
        self._advance(data.numel())
        self._file.write(data)

    def copy_from(self, src: BinaryIO, offset: int, nbytes: int) -> None:
        """Copy raw bytes from another file (positional reads: other threads share ``src``)."""
        self._advance(nbytes)
        try:
            self._file.copy_from(src.fileno(), offset, nbytes)
        except EOFError:
            raise SafetensorsFormatError(f"unexpected end of {getattr(src, 'name', 'file')}") from None

    def close(self) -> None:
        # No fsync here: the kernel writes dirty pages back while later shards are merged;
        # the caller fsyncs every file once, right before the atomic rename (fsync_tree).
        if self._file.closed:
            return
        while self._index < len(self._tensors) and self._tensors[self._index].nbytes == 0:
            self._index += 1
        complete = self._index == len(self._tensors) and self._written_in_current == 0
        self._file.close()
        if not complete:
            raise RuntimeError(f"{self.path.name}: closed before all declared tensors were written")

    def abort(self) -> None:
        if not self._file.closed:
            self._file.abort()


def fsync_tree(folder: Path) -> None:
    """Make every file in folder, and the folder entry itself, durable before a rename publishes it."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
