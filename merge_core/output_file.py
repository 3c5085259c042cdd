"""The file a merged shard is written to: past the page cache where the filesystem allows (O_DIRECT).

A merge writes every byte of the model once and never reads it back while writing, so the page
cache only costs: on the 3B benchmark (6 GB, 2 cores) buffered writes took 11.6 s of system time
(the kernel's copy into the cache, allocating its pages, writing them back) and O_DIRECT writes from
our own aligned buffers 0.5-1.1 s; the merge went from 11.3-14.1 s to 5.8-7.1 s (benchmarks/RESULTS.md).
Bytes are gathered into page-aligned chunks, and a thread of this file writes full chunks while the
next ones fill, so the disk works while the merge computes. Filesystems without O_DIRECT (tmpfs,
some network and FUSE filesystems, macOS) get ordinary buffered writes and ``copy_file_range``.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no O_DIRECT either, so DirectFile is never used
    fcntl = None  # type: ignore[assignment]

# O_DIRECT wants offsets, lengths and buffer addresses aligned to the device's logical block
# (512 or 4096 bytes); a page covers both.
ALIGN = mmap.PAGESIZE
CHUNK_BYTES = 8 << 20
# Chunks queued for the disk while one more fills: 8 MiB each, 32 MiB in all per open file.
QUEUED_CHUNKS = 3
_O_DIRECT = getattr(os, "O_DIRECT", 0) if fcntl is not None else 0


Check = Callable[[torch.Tensor], None] | None


class OutputFile(Protocol):
    closed: bool

    def write(self, data: torch.Tensor) -> None: ...
    def write_rounded(self, values: torch.Tensor, dtype: torch.dtype, check: Check) -> None: ...
    def copy_from(self, src_fd: int, offset: int, nbytes: int) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def open_output(path: Path, *, direct: bool = True) -> OutputFile:
    """A new, truncated output file at ``path``: direct where the filesystem takes O_DIRECT, else buffered."""
    if direct and _O_DIRECT:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            return DirectFile(fd, chunk_bytes=CHUNK_BYTES)
    return BufferedFile(path)


def _as_bytes(data: torch.Tensor | bytes) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).view(torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class BufferedFile:
    """Ordinary writes through the page cache; raw copies stay in the kernel (``copy_file_range``)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, data: torch.Tensor | bytes) -> None:
        flat = _as_bytes(data)
        if flat.numel():
            self._file.write(memoryview(flat.numpy()))

    def write_rounded(self, values: torch.Tensor, dtype: torch.dtype, check: Check) -> None:
        self._rounded = _round_into(getattr(self, "_rounded", None), values, dtype)
        rounded = self._rounded[: values.numel()]
        if check is not None:
            check(rounded)
        self.write(rounded)

    def copy_from(self, src_fd: int, offset: int, nbytes: int) -> None:
        self._file.flush()
        dst_fd, done = self._file.fileno(), 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
                    if n == 0:
                        raise EOFError
                    done += n
            except OSError:
                pass  # e.g. across filesystems on older kernels: the loop below finishes the copy
            finally:
                # copy_file_range advances dst's kernel offset; keep Python's view in sync.
                self._file.seek(0, os.SEEK_END)
        while done < nbytes:
            buf = os.pread(src_fd, min(16 << 20, nbytes - done), offset + done)
            if not buf:
                raise EOFError
            self._file.write(buf)
            done += len(buf)

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class DirectFile:
    """Appends through page-aligned chunks written with O_DIRECT on a thread of its own.

    Errors of the disk thread (ENOSPC, EIO) surface on the next ``write`` or at ``close``.
    """

    def __init__(self, fd: int, *, chunk_bytes: int = CHUNK_BYTES, queued: int = QUEUED_CHUNKS) -> None:
        self._fd, self._chunk_bytes, self.closed = fd, chunk_bytes, False
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(queued + 1):
            self._free.put(mmap.mmap(-1, chunk_bytes))  # anonymous maps are page-aligned
        self._full: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        self._error: OSError | None = None
        self._aborted = False
        self._chunk, self._filled, self._offset = self._take(), 0, 0
        self._thread = threading.Thread(target=self._run, name="direct-write", daemon=True)
        self._thread.start()

    def _take(self) -> mmap.mmap:
        chunk = self._free.get()
        if self._error is not None:
            raise self._error
        return chunk

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            chunk, nbytes, offset = item
            try:
                if self._error is None and not self._aborted:
                    _pwrite_all(self._fd, memoryview(chunk)[:nbytes], offset)
            except OSError as exc:
                self._error = exc
            finally:
                self._free.put(chunk)

    def _chunk_view(self) -> torch.Tensor:
        return torch.frombuffer(self._chunk, dtype=torch.uint8)

    def _hand_over(self) -> None:
        self._full.put((self._chunk, self._chunk_bytes, self._offset))
        self._offset += self._chunk_bytes
        self._chunk, self._filled = self._take(), 0

    def write(self, data: torch.Tensor | bytes) -> None:
        flat, done = _as_bytes(data), 0
        while done < flat.numel():
            n = min(flat.numel() - done, self._chunk_bytes - self._filled)
            self._chunk_view()[self._filled : self._filled + n].copy_(flat[done : done + n])
            done, self._filled = done + n, self._filled + n
            if self._filled == self._chunk_bytes:
                self._hand_over()

    def write_rounded(self, values: torch.Tensor, dtype: torch.dtype, check: Check) -> None:
        """Round ``values`` (flat) to ``dtype`` straight into the chunks; no staging copy."""
        size = torch.empty(0, dtype=dtype).element_size()
        if self._filled % size or self._chunk_bytes % size:  # a piece could not be viewed as ``dtype``
            self._rounded = _round_into(getattr(self, "_rounded", None), values, dtype)
            rounded = self._rounded[: values.numel()]
            if check is not None:
                check(rounded)
            self.write(rounded)
            return
        done = 0
        while done < values.numel():
            n = min(values.numel() - done, (self._chunk_bytes - self._filled) // size)
            piece = self._chunk_view()[self._filled : self._filled + n * size].view(dtype)
            piece.copy_(values[done : done + n])
            if check is not None:
                check(piece)
            done, self._filled = done + n, self._filled + n * size
            if self._filled == self._chunk_bytes:
                self._hand_over()

    def copy_from(self, src_fd: int, offset: int, nbytes: int) -> None:
        """Raw bytes of another file, read straight into the chunks (O_DIRECT cannot take copy_file_range)."""
        done = 0
        while done < nbytes:
            n = min(nbytes - done, self._chunk_bytes - self._filled)
            got = os.preadv(src_fd, [memoryview(self._chunk)[self._filled : self._filled + n]], offset + done)
            if got == 0:
                raise EOFError
            done, self._filled = done + got, self._filled + got
            if self._filled == self._chunk_bytes:
                self._hand_over()

    def _finish_threads(self) -> None:
        self._full.put(None)
        self._thread.join()

    def close(self) -> None:
        if self.closed:
            return
        self._finish_threads()
        try:
            if self._error is not None:
                raise self._error
            aligned = self._filled // ALIGN * ALIGN
            view = memoryview(self._chunk)
            _pwrite_all(self._fd, view[:aligned], self._offset)
            # The tail is not a whole block, which O_DIRECT refuses: write it through the cache.
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
            _pwrite_all(self._fd, view[aligned : self._filled], self._offset + aligned)
        finally:
            self.closed = True
            os.close(self._fd)

    def abort(self) -> None:
        if not self.closed:
            self._aborted = True  # the file is being thrown away: skip the queued writes
            self._finish_threads()
            self.closed = True
            os.close(self._fd)


def _round_into(buffer: torch.Tensor | None, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded to ``dtype`` in a reused buffer (grown when too small); returns the buffer."""
    if buffer is None or buffer.dtype != dtype or buffer.numel() < values.numel():
        buffer = torch.empty(values.numel(), dtype=dtype)
    buffer[: values.numel()].copy_(values)
    return buffer


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT:
                raise
            # The open took O_DIRECT but this filesystem refuses the write (some FUSE and overlay
            # mounts): the rest of the file goes through the page cache.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            continue
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
