"""The disk a streamed pipeline may use: a budget checked up front, and the bytes it really held, measured."""

from __future__ import annotations

import math
import shutil
import threading
from pathlib import Path

from .errors import DiskBudgetError
from .plan import MergePlan
from .safetensors_io import element_size

# Kept free beside the pipeline by default: logs, the OS and other jobs need some disk too.
DEFAULT_DISK_MARGIN = 1 << 30


class DiskMeter:
    """Bytes of regular files under some folders, sampled by a thread and at each pipeline event."""

    def __init__(self, roots: list[Path], interval: float = 0.02) -> None:
        self.roots, self.interval, self.peak = roots, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-meter", daemon=True)

    def usage(self) -> int:
        for _ in range(3):
            try:
                return self._walk()
            except OSError:
                continue  # a folder vanished while we walked it (the pipeline deletes as it goes): walk again
        return 0

    def _walk(self) -> int:
        seen, total = set(), 0
        for root in self.roots:
            for path in root.rglob("*") if root.exists() else ():
                try:
                    st = path.lstat()
                except OSError:
                    continue  # removed while we walked
                if path.is_symlink() or not path.is_file() or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
        return total

    def sample(self) -> int:
        now = self.usage()
        self.peak = max(self.peak, now)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> DiskMeter:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def default_max_disk(workdir: Path, margin: int = DEFAULT_DISK_MARGIN) -> int:
    """What is free where the pipeline writes, less a margin."""
    existing = next(p for p in (workdir, *workdir.parents) if p.exists())
    return max(0, shutil.disk_usage(existing).free - margin)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def check_budget(needed: int, budget: int) -> None:
    if needed > budget:
        raise DiskBudgetError(
            f"The streamed push needs about {human_bytes(needed)} of disk (two input shards, two output shards and "
            f"the adapter) but the budget is {human_bytes(budget)}; free some space, raise --max-disk or choose a "
            "smaller --max-shard-size.",
            needed=needed,
            budget=budget,
        )


__all__ = ["DEFAULT_DISK_MARGIN", "DiskMeter", "check_budget", "default_max_disk", "human_bytes"]


def shard_needs(plan: MergePlan) -> list[set[Path]]:
    """For each output shard, the base shard files its tensors read (quantized side tensors included)."""
    where = {name: t.shard for name, t in plan.base.tensors.items()}
    needs = []
    for shard in plan.shards:
        need: set[Path] = set()
        for t in shard:
            if t.base is not None:
                need.add(Path(t.base.shard))
            if t.quantized is not None:
                need |= {Path(where[p]) for p in t.quantized.parts.values() if p in where}
        needs.append(need)
    return needs


def output_shard_bytes(plan: MergePlan) -> list[int]:
    """Each output shard's file size, its JSON header estimated (a few hundred bytes per tensor)."""
    return [sum(math.prod(t.shape) * element_size(t.dtype) + 256 for t in shard) + 8 for shard in plan.shards]


def disk_needed(plan: MergePlan, *, folder: Path, sizes: dict[str, int], adapter_dir: Path) -> int:
    """The least the pipeline can run in, without prefetching: the worst output shard i with the base shards it
    reads, plus output shard i - 1 still uploading, plus the adapter and the small files."""
    out = output_shard_bytes(plan)
    folder = Path(folder)
    worst = max(
        sum(sizes.get(p.relative_to(folder).as_posix(), 0) for p in need) + out[i] + (out[i - 1] if i else 0)
        for i, need in enumerate(shard_needs(plan))
    )
    small = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name not in sizes)
    adapter = sum(p.stat().st_size for p in Path(adapter_dir).rglob("*") if p.is_file())
    return worst + 2 * small + adapter  # the output carries its own config, tokenizer and index
