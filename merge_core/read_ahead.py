"""Read-ahead for the merge: a thread reads the next row blocks while the merge thread computes.

The executor knows every block it will read, in order, before it starts a shard, so one thread
walks that list through a small pool of reused buffers. Reads are positional (``os.preadv``) and
release the GIL, so they overlap the arithmetic and the writer thread's disk writes. Memory: at
most ``depth + 2`` row blocks in the base's stored dtype.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .tensor_math import Workspace


@dataclass(frozen=True)
class BlockRead:
    """One row block to read: ``read(buffer)`` returns its rows (a view of ``buffer`` when it uses it)."""

    key: tuple[str, int, int]  # tensor name, first row, end row
    nbytes: int  # buffer bytes ``read`` needs (0: it does not read into the buffer)
    read: Callable[[torch.Tensor], torch.Tensor]


class ReadAhead:
    """Hands out the blocks of ``jobs`` in order; a block stays valid until the next ``next`` call."""

    def __init__(self, jobs: Iterable[BlockRead], depth: int = 2) -> None:
        self._jobs = iter(jobs)
        self._ready: queue.Queue[tuple] = queue.Queue(maxsize=depth)
        self._free: queue.Queue[Workspace] = queue.Queue()
        for _ in range(depth + 2):  # one being filled, ``depth`` waiting, one in the caller's hands
            self._free.put(Workspace())
        self._held: Workspace | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for job in self._jobs:
                if self._stop.is_set():
                    return
                pool = self._free.get()
                rows = job.read(pool.get("read", (job.nbytes,), torch.uint8))
                self._ready.put((job.key, rows, pool, None))
            self._ready.put((None, None, None, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._ready.put((None, None, None, exc))

    def next(self, key: tuple[str, int, int]) -> torch.Tensor:
        if self._held is not None:
            self._free.put(self._held)
            self._held = None
        got, rows, pool, error = self._ready.get()
        if error is not None:
            raise error
        if got != key:
            raise RuntimeError(f"read-ahead out of step: expected {key}, got {got}")
        self._held = pool
        return rows

    def close(self) -> None:
        """Stop the thread (also mid-way, after an error) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                _, _, pool, _ = self._ready.get(timeout=0.05)
            except queue.Empty:
                continue
            if pool is not None:
                self._free.put(pool)
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
