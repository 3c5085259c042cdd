"""A StreamingWriter on a thread of its own, so that disk writes overlap the merge math."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

import torch

from .safetensors_io import _ELEMENT_SIZE, ST_FROM_DTYPE, StreamingWriter, _ClosesOnSuccess
from .tensor_math import Workspace


class BlockRing:
    """A few working blocks that the merge thread fills and the writer thread rounds, in turn.

    Handing the block itself to the writer (not a rounded copy) moves the rounding off the merge
    thread and lets the writer round straight into the output file's buffers; a block is reused only
    after the writer has rounded it, so the merge never overwrites a block still being written.
    """

    def __init__(self, device: torch.device, slots: int = 3) -> None:
        self._slots = [(Workspace(device), threading.Event()) for _ in range(slots)]
        for _, idle in self._slots:
            idle.set()
        self._turn = 0
        self.current: tuple[Workspace, threading.Event] | None = None

    def next(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next slot's block, once the writer is done with its previous contents."""
        workspace, idle = self.current = self._slots[self._turn]
        self._turn = (self._turn + 1) % len(self._slots)
        idle.wait()
        return workspace.get("block", shape, dtype)

    def owns(self, tensor: torch.Tensor) -> threading.Event | None:
        """The current slot's idle flag when ``tensor`` lives in its block (ops may return other tensors)."""
        if self.current is None:
            return None
        workspace, idle = self.current
        block = workspace.get("block", (0,), tensor.dtype, tensor.device)
        same = tensor.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
        return idle if same else None


class BackgroundWriter(_ClosesOnSuccess):
    """Runs a StreamingWriter's writes on a thread so disk writes overlap the merge math.

    Bounded: at most ``depth`` blocks wait in the queue, each a private copy of the caller's
    (reused) buffer, so memory stays at a few row blocks. Errors surface on the next call
    or at close, and the order of writes is kept.
    """

    def __init__(self, writer: StreamingWriter, depth: int = 2) -> None:
        self._writer = writer
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize=depth)
        # Reused staging buffers: a fresh allocation per block page-faults as much as it copies.
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(depth + 1):
            self._free.put(torch.empty(0, dtype=torch.uint8))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"write-{writer.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, *args = item
            try:
                if self._error is not None:
                    continue  # drain: the caller will see the first error
                if kind == "begin":
                    self._writer.begin(*args)
                elif kind == "write":
                    staged, nbytes, view, check = args
                    if check is not None:
                        check(view)  # here, not in the caller: it overlaps the caller's next block of math
                    self._writer.write(staged[:nbytes])
                elif kind == "round":
                    block, dtype, check, _ = args
                    self._writer.write(block, dtype, check=check)
                else:
                    self._writer.copy_from(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = exc
            finally:
                # Every staged buffer and ring block returns to its owner, also after an error:
                # otherwise the caller can block forever waiting for a free one.
                if kind == "write":
                    self._free.put(args[0])
                elif kind == "round":
                    args[3].set()

    def _put(self, item: tuple) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def begin(self, name: str) -> None:
        self._put(("begin", name))

    def write(
        self, tensor: torch.Tensor, dtype: torch.dtype | None = None, *, check: Callable | None = None
    ) -> torch.Tensor:
        """Queue ``tensor`` converted to ``dtype`` (default: its own); the conversion writes
        straight into a staging buffer, so rounding and staging are one pass.

        Returns the staged (converted) values. They stay valid until the next ``write``: only
        the caller's thread takes buffers from the pool, the writer thread only reads them."""
        if self._error is not None:
            raise self._error
        data = tensor.detach()
        dtype = dtype or data.dtype
        if dtype == torch.bool:
            data, dtype = data.to(torch.uint8), torch.uint8
        nbytes = data.numel() * _ELEMENT_SIZE[ST_FROM_DTYPE[dtype]]
        staged = self._free.get()
        if staged.numel() < nbytes:
            staged = torch.empty(nbytes, dtype=torch.uint8)
        view = staged[:nbytes].view(dtype).view(data.shape)
        if nbytes:
            view.copy_(data)
        self._put(("write", staged, nbytes, view, check))
        return view

    def round_block(self, block: torch.Tensor, dtype: torch.dtype, idle: threading.Event, *, check: Callable) -> None:
        """Queue a BlockRing block, rounded to ``dtype`` on the writer thread straight into the file's
        buffers; ``idle`` is set once the block may be reused."""
        idle.clear()
        try:
            self._put(("round", block, dtype, check, idle))
        except BaseException:
            idle.set()
            raise

    def copy_from(self, src: BinaryIO, offset: int, nbytes: int) -> None:
        self._put(("copy", src, offset, nbytes))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            self._writer.abort()
            raise self._error
        self._writer.close()

    def abort(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._writer.abort()


__all__ = ["BackgroundWriter"]
