"""The function rows of a streamed push, computed while the shards go by.

layer_stream.LayerRuns runs the three forwards (base + adapter with PEFT's math, merged, base) over the
probe inputs; here it is advanced each time an output shard is written, as far as the base shards not yet
deleted and the output shards not yet deleted allow, in model order. The pipeline asks ``release`` before it
deletes a shard: a shard that the unit each forward paused before still reads is held one more shard (a unit
straddling two shards; the pipeline's bound of about two input and two output shards still holds, since the
prefetch is checked against the budget with the held shard counted). Tensors that units further on read
from a shard that goes now (a tied head that is the embedding matrix of the first shard) are copied to RAM,
at most one unit plus one matrix per model (a layer spread over small shards, and a head stored before the
layers); beyond that the rows are skipped and say why: never a wrong row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from .checkpoint import BaseTensor
from .disk_budget import shard_needs
from .errors import ModelLoadError
from .layer_stream import DiskView, LayerRuns, _Source, streamed_runs
from .models import MergedModelLoadError, short_error
from .plan import MergePlan
from .safetensors_io import read_header
from .stream_transfer import Uploader
from .verify_function import _merged_does_not_load, _planned_rows, _skipped
from .verify_report import Check

_AFTER = "merge to an OUTPUT folder with --verify for these rows"


def held_bytes(plan: MergePlan, *, folder: Path, sizes: dict[str, int]) -> int:
    """What holding base shards one more output shard can add to disk_needed: the most bytes of base
    shards that output shard i - 1 consumed last, on disk while output shard i is merged."""
    needs, folder = shard_needs(plan), Path(folder)
    last = {path: i for i, need in enumerate(needs) for path in need}
    consumed = [{p for p in need if last[p] == i} for i, need in enumerate(needs)]
    return max((sum(sizes.get(p.relative_to(folder).as_posix(), 0) for p in c) for c in consumed[:-1]), default=0)


class StreamedFunctionRows:
    """Feed it the base shards as they are located and the output shards as they are written; ``release``
    says whether a shard may be deleted now; ``rows`` gives the function rows at the end."""

    def __init__(self, plan: MergePlan, workdir: Path, *, device: str = "cpu") -> None:
        self.plan = plan
        self.view = DiskView(plan.base.tensors, {})  # the plan's own dict: locate_shard updates it in place
        self.stack = ExitStack()
        self.runs: LayerRuns | None = None
        self.result: list[Check] | None = None
        self.kept_peak = 0  # the most elements copied to RAM at once, per model
        self.held_base: list[Path] = []
        self.held_out: list[Path] = []
        self.holds = 0  # shards held one more step, for the report's measurements
        config_dir = Path(workdir) / "function-rows-config"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "config.json").write_text(json.dumps(plan.config))
        try:
            self.runs = self.stack.enter_context(streamed_runs(plan, self.view, config_dir, device=device))
        except Exception as exc:  # noqa: BLE001 - the rows say why, the push goes on
            self._give_up(exc)

    def base_arrived(self, path: Path) -> None:
        self.view.base_present.add(path)

    def shard_written(self, path: Path) -> None:
        """Record the shard's tensors and run every unit that can run now."""
        header = read_header(path)
        self.view.merged.update({name: BaseTensor(path, info) for name, info in header.tensors.items()})
        self.view.merged_present.add(path)
        if self.runs is None:
            return
        try:
            if self.runs.advance():
                self.result = self.runs.rows("a streamed push")
                self.close()
                return
        except Exception as exc:  # noqa: BLE001 - a failed forward is a row, not a failed push
            self._give_up(exc)
            return
        self._forget_used()

    def after_shard(
        self, consumed: list[Path], written: Path, *, drop: Callable[[Path], None], uploader: Uploader, last: bool
    ) -> None:
        """Delete the base shards the merge consumed, and let the uploader delete ``written`` once sent,
        holding for one more shard those that a paused unit still reads (never past the last shard)."""
        for path in self.held_base:
            self.release(path, "base", may_hold=False)
            drop(path)
        for path in self.held_out:
            self.release(path, "merged", may_hold=False)
            uploader.release(path)
        self.held_base = [p for p in consumed if not self.release(p, "base", may_hold=not last)]
        for path in consumed:
            if path not in self.held_base:
                drop(path)
        self.held_out = [] if self.release(written, "merged", may_hold=not last) else [written]
        for path in self.held_out:
            uploader.hold(path)
        self.holds += len(self.held_base) + len(self.held_out)

    def release(self, path: Path, which: str, *, may_hold: bool) -> bool:
        """Whether ``path`` ("base" or "merged") may be deleted now; False: hold it until the next shard."""
        present = self.view.base_present if which == "base" else self.view.merged_present
        if self.runs is not None:
            source, live = self.runs.source(which), self.view.base if which == "base" else self.view.merged
            now, later = self.runs.needed(which)

            def here(names: set[str]) -> set[str]:
                return {n for n in names if n in live and Path(live[n].shard) == path and n not in source.kept}

            hold, keep = here(now - later), here(later)
            if hold and may_hold:
                return False
            self._keep(source, live, hold | keep, path)
            source.files.close()  # an open handle would keep a deleted file's blocks in use
        present.discard(path)
        return True

    def _keep(self, source: _Source, live: dict[str, BaseTensor], names: set[str], path: Path) -> None:
        """Copy what later units read from a shard that goes now to RAM: at most the largest unit (what remains
        of a layer spread over several small shards) plus the largest matrix (a head stored early)."""
        if self.runs is None or not names:
            return
        size = sum(source.kept[n].numel() for n in source.kept) + sum(live[n].info.numel for n in names)
        largest = max((t.info.numel for t in self.plan.base.tensors.values()), default=0)
        if size > self.runs.stats.largest_unit + largest:
            first = sorted(names)[0]
            self._skip(
                f"skipped: {first} is read after {path.name} is deleted, and keeping it in memory would exceed one "
                f"layer's weights and one matrix (the shard order spreads a unit beyond the streamed window); {_AFTER}"
            )
            return
        for name in sorted(names):
            source.kept[name] = source.read(live[name])
        self.kept_peak = max(self.kept_peak, size)

    def _forget_used(self) -> None:
        """Drop the RAM copies no unit still reads."""
        for which in ("base", "merged"):
            now, later = self.runs.needed(which)
            kept = self.runs.source(which).kept
            for name in [n for n in kept if n not in now | later]:
                del kept[name]

    def rows(self) -> list[Check]:
        """The function rows once every shard went by (skipped with the reason when they could not run)."""
        if self.result is None:
            self._skip(
                f"skipped: the layer-by-layer forward passes never had all of a unit's tensors on disk; {_AFTER}"
            )
        return self.result

    def _skip(self, reason: str) -> None:
        self.result = _skipped(_planned_rows(self.plan), reason)
        self.close()

    def _give_up(self, exc: Exception) -> None:
        if isinstance(exc, MergedModelLoadError):
            self.result = _merged_does_not_load(_planned_rows(self.plan), str(exc))
            self.close()
        elif isinstance(exc, ModelLoadError):
            self._skip(f"{str(exc).rstrip('.')}; {_AFTER}")
        else:
            self._skip(f"the layer-by-layer forward pass failed ({short_error(exc)})")

    def close(self) -> None:
        self.runs = None
        self.stack.close()


__all__ = ["StreamedFunctionRows", "held_bytes"]
