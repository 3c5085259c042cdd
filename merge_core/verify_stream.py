"""The verification table of a streamed push, built shard by shard while each shard's inputs are on disk.

verify.verify_merge reads a finished folder; a streamed push never has one. Here each output shard is
checked right after it is written, while it uploads and before the base shards it read are deleted: the
numerics rows (adapted tensors against the float64 reference, rounded once, and the random probes), the
untouched tensors bit for bit against the base, NaN/Inf. These read sampled rows of every tensor (the
first, the last and evenly spaced windows): the full check of a 5 GB shard took 260 s on 2 shared cores,
longer than the shard's upload, so it held the pipeline back (benchmarks/RESULTS.md). The structure rows
and the config and tokenizer row follow once the index and the small files are written. The function rows
are computed alongside, layer by layer while the shards go by (stream_function), and handed to ``report``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .plan import MergePlan
from .progress import ProgressCallback, ProgressUpdate, no_progress
from .safetensors_io import TensorInfo, read_header
from .tensor_math import DEFAULT_BLOCK_ELEMENTS
from .verify import _files_check, _Findings, _Found, _numerics_checks, _stream_tensors, _structure_checks
from .verify_report import Check, VerificationReport

SAMPLE_WINDOWS, SAMPLE_ROWS = 4, 32
SAMPLED = f"sampled: {SAMPLE_WINDOWS} windows of {SAMPLE_ROWS} rows per tensor (first, last, evenly between)"
_SAMPLED_ROWS = ("untouched tensors bit-identical to base", "every adapted tensor changed", "no NaN/Inf")


def sampled_rows(n_rows: int, _step: int) -> list[tuple[int, int]]:
    """The row windows a streamed check reads: all rows of a small tensor, else first, last and between."""
    if n_rows <= SAMPLE_WINDOWS * SAMPLE_ROWS:
        return [(0, n_rows)]
    last = n_rows - SAMPLE_ROWS
    starts = sorted({round(i * last / (SAMPLE_WINDOWS - 1)) for i in range(SAMPLE_WINDOWS)})
    return [(a, a + SAMPLE_ROWS) for a in starts]


class ShardVerifier:
    """Feed it each output shard as it is written (``shard_written``); ``report`` then builds the table."""

    def __init__(
        self,
        plan: MergePlan,
        *,
        progress: ProgressCallback = no_progress,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ) -> None:
        self.plan, self.progress, self.block_elements = plan, progress, block_elements
        self.tensors: dict[str, tuple[Path, TensorInfo]] = {}
        self.problems: list[str] = []
        self.findings = _Findings()
        self.total = sum(t.planned().nbytes for t in plan.tensors)
        self.done = 0

    def shard_written(self, path: Path) -> None:
        """Check every tensor of one output shard against the base shards still on disk."""
        header = read_header(path)
        shard = {name: (path, info) for name, info in header.tensors.items()}
        self.tensors.update(shard)
        found = _Found(shard, [])
        _structure_checks(self.plan, found)  # marks wrong shapes and dtypes, which the numerics skip
        offset = self.done

        def forward(update: ProgressUpdate) -> None:
            self.done = offset + int(update.done)
            self.progress(ProgressUpdate("verify", min(self.done, self.total), self.total, "B", path.name))

        part = _stream_tensors(
            self.plan, found, block_elements=self.block_elements, progress=forward, rows=sampled_rows
        )
        self.findings.changed_unexpectedly += part.changed_unexpectedly
        self.findings.unchanged_unexpectedly += part.unchanged_unexpectedly
        self.findings.nonfinite += part.nonfinite
        self.findings.modules += part.modules

    def report(self, output_dir: Path, function: list[Check]) -> VerificationReport:
        """The table, once ``output_dir`` holds the index, config, tokenizer (the shards may be gone);
        ``function``: the rows stream_function computed while the shards went by."""
        found = _Found(self.tensors, self.problems + _index_problems(output_dir, self.tensors))
        report = VerificationReport(checks=_structure_checks(self.plan, found), modules=self.findings.modules)
        structure, numerics = self.findings.checks(), _numerics_checks(self.plan, self.findings.modules)
        for check in [*structure, *numerics]:
            if check.group == "numerics" or check.name in _SAMPLED_ROWS:
                check.detail = "; ".join(filter(None, [check.detail, SAMPLED]))
        report.checks += [
            *structure,
            _files_check(self.plan, output_dir),
            *numerics,
            *function,
        ]
        return report


def _index_problems(output_dir: Path, tensors: dict[str, tuple[Path, TensorInfo]]) -> list[str]:
    """The index written at the end must map each tensor to the shard it was found in."""
    index = output_dir / "model.safetensors.index.json"
    if not index.is_file():
        return [] if {p.name for p, _ in tensors.values()} <= {"model.safetensors"} else ["no index for the shards"]
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    return [
        f"index maps {name} to {weight_map.get(name)}, found in {path.name}"
        for name, (path, _) in tensors.items()
        if weight_map.get(name) != path.name
    ][:3]


__all__ = ["ShardVerifier"]
