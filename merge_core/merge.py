"""The streaming merge: one output shard at a time, one row block of one tensor at a time."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import InsufficientDiskError, MergeError, OutputExistsError
from .plan import MergeOptions, MergePlan, OutputTensorPlan, build_plan, dtype_name
from .progress import ProgressCallback, ProgressUpdate, no_progress
from .report import MergeReport, ModuleReport
from .safetensors_io import DTYPE_FROM_ST, BackgroundWriter, OpenFiles, StreamingWriter, element_size, fsync_tree, read_rows
from .tensor_math import (
    DEFAULT_BLOCK_ELEMENTS,
    ColumnNorms,
    LoadedDelta,
    Workspace,
    dora_row_factor,
    apply_deltas_,
    row_blocks,
    rows_per_block,
)

# Room for config/tokenizer files and filesystem overhead on top of the weights.
_DISK_MARGIN_BYTES = 64 << 20


@dataclass
class _Timings:
    read: float = 0.0
    math: float = 0.0
    write: float = 0.0  # handing blocks to the writer thread (disk writes overlap the math)
    copy: float = 0.0
    sync: float = 0.0  # the final fsync: what the disk still had to write


@dataclass
class _Context:
    plan: MergePlan
    device: torch.device
    compute_dtype: torch.dtype
    block_elements: int
    workspace: Workspace = field(default_factory=Workspace)
    files: OpenFiles = field(default_factory=OpenFiles)
    timings: _Timings = field(default_factory=_Timings)

    def adapter_tensor(self, key: str, transpose: bool = False) -> torch.Tensor:
        t = self.plan.adapter.tensor(key).to(device=self.device, dtype=self.compute_dtype)
        return t.T.contiguous() if transpose else t


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(
            f"{output_dir} already exists. Choose another output folder or pass overwrite=True (CLI: --overwrite)."
        )


def check_disk(directory: Path, needed: int, what: str = "the merged model") -> None:
    directory = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(directory).free
    if free < needed + _DISK_MARGIN_BYTES:
        raise InsufficientDiskError(
            f"Not enough disk space for {what}: it needs {(needed + _DISK_MARGIN_BYTES) / 1e9:.2f} GB "
            f"but only {free / 1e9:.2f} GB are free at {directory}. Free some space or choose another output folder."
        )


def _write_tensor(ctx: _Context, writer: BackgroundWriter, t: OutputTensorPlan, on_bytes) -> None:
    writer.begin(t.name)
    out_dtype = DTYPE_FROM_ST[t.dtype]
    if t.is_copy:
        began = time.perf_counter()
        assert t.base is not None
        writer.copy_from(ctx.files.get(t.base.shard), t.base.info.begin, t.base.info.nbytes)
        ctx.timings.copy += time.perf_counter() - began
        on_bytes(t.base.info.nbytes)
        return

    ws = ctx.workspace
    n_rows = t.shape[0] if t.shape else 1
    step = rows_per_block(t.shape, ctx.block_elements)
    if t.adapter_key is not None:
        full_start = ctx.plan.adapter.tensor(t.adapter_key)
        read = lambda a, b: full_start[a:b] if t.shape else full_start  # noqa: E731
    else:
        assert t.base is not None
        f, info = ctx.files.get(t.base.shard), t.base.info
        read_buf = ws.get("read", (step * max(1, info.nbytes // max(1, n_rows)),), torch.uint8, torch.device("cpu"))
        read = lambda a, b: read_rows(f, info, a, b, read_buf)  # noqa: E731

    def block_shape(a: int, b: int) -> tuple[int, ...]:
        return (b - a, *t.shape[1:]) if t.shape else ()

    def emit(work: torch.Tensor, a: int, b: int) -> None:
        began = time.perf_counter()
        if work.device.type != "cpu":
            # Round on the accelerator: the copy back then moves 2 bytes per element, not 8.
            rounded = ws.get("rounded", block_shape(a, b), out_dtype)
            rounded.copy_(work)
            work = rounded
        writer.write(work, out_dtype)  # the one rounding to the output dtype, into the write buffer
        ctx.timings.write += time.perf_counter() - began
        on_bytes(work.numel() * element_size(t.dtype))

    def timed_read(a: int, b: int) -> torch.Tensor:
        began = time.perf_counter()
        start = read(a, b)
        ctx.timings.read += time.perf_counter() - began
        return start

    if not t.changed:  # dtype conversion only
        for a, b in row_blocks(n_rows, step):
            emit(timed_read(a, b), a, b)
        return

    deltas = [
        LoadedDelta(ctx.adapter_tensor(d.l_key, d.l_transpose), ctx.adapter_tensor(d.r_key, d.r_transpose), d.scale)
        for d in t.deltas
    ]
    bias_deltas = [(ctx.adapter_tensor(key).reshape(-1), scale) for key, scale in t.bias_deltas]
    magnitude = ctx.adapter_tensor(t.dora.magnitude_key).reshape(-1) if t.dora else None

    def exact(a: int, b: int) -> torch.Tensor:
        start = timed_read(a, b)
        began = time.perf_counter()
        work = ws.get("work", block_shape(a, b), ctx.compute_dtype)
        if work.device.type != "cpu":
            # Move the stored dtype (2 bytes/element), widen on the accelerator.
            staged = ws.get("start", block_shape(a, b), start.dtype)
            staged.copy_(start)
            start = staged
        work.copy_(start)
        work = apply_deltas_(work, a, deltas, bias_deltas)
        ctx.timings.math += time.perf_counter() - began
        return work

    col_factor = None
    if t.dora is not None and t.dora.axis == "col":
        norms = ColumnNorms()
        for a, b in row_blocks(n_rows, step):
            norms.add(exact(a, b))
        col_factor = norms.factor(magnitude)  # type: ignore[arg-type]

    for a, b in row_blocks(n_rows, step):
        work = exact(a, b)
        if t.dora is not None:
            began = time.perf_counter()
            work.mul_(col_factor if col_factor is not None else dora_row_factor(work, magnitude[a:b]))  # type: ignore[index]
            ctx.timings.math += time.perf_counter() - began
        emit(work, a, b)


def _replace_dir(tmp: Path, output_dir: Path) -> None:
    if output_dir.exists():
        trash = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
        output_dir.rename(trash)
        tmp.rename(output_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(output_dir)


def execute_plan(
    plan: MergePlan,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: ProgressCallback = no_progress,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> MergeReport:
    """Write the merged model into output_dir, atomically: all of it or nothing."""
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite)
    check_disk(output_dir.parent, plan.output_nbytes)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the final rename stays on one filesystem and is atomic.
    tmp = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    device = torch.device(plan.options.device)
    ctx = _Context(plan, device, plan.compute_dtype, block_elements, Workspace(device))
    total = plan.output_nbytes
    done = 0
    started = time.perf_counter()

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        progress(ProgressUpdate("merge", done, total, "B"))

    try:
        names = plan.shard_names()
        weight_map: dict[str, str] = {}
        progress(ProgressUpdate("merge", 0, total, "B", "starting"))
        for shard_name, shard in zip(names, plan.shards):
            writer = StreamingWriter(tmp / shard_name, [t.planned() for t in shard], {"format": "pt"})
            with BackgroundWriter(writer) as writer:
                for t in shard:
                    _write_tensor(ctx, writer, t, on_bytes)
                    weight_map[t.name] = shard_name
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        for name, src in plan.copy_files.items():
            shutil.copyfile(src, tmp / name)
        began = time.perf_counter()
        fsync_tree(tmp)
        ctx.timings.sync += time.perf_counter() - began
        _replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ctx.files.close()
    elapsed = time.perf_counter() - started
    return _report(plan, output_dir, names, ctx, elapsed)


def _report(plan: MergePlan, output_dir: Path, shards: list[str], ctx: _Context, elapsed: float) -> MergeReport:
    modules = []
    for m in plan.modules:
        modules.append(
            ModuleReport(
                module=m.module,
                tensor=m.tensor,
                kind=m.kind,
                variant=m.variant,
                shape=tuple(m.shape),
                rank=m.rank,
                alpha=m.alpha,
                scale=m.scale,
                fan_in_fan_out=m.fan_in_fan_out,
            )
        )
    changed = [t.name for t in plan.tensors if t.changed]
    config_changes = {
        k: v for k, v in plan.config.items() if plan.base.config.get(k) != v and k != "text_config"
    }
    return MergeReport(
        base=plan.options.base_name or plan.base.display_name,
        adapter=plan.options.adapter_name or str(plan.adapter.path),
        adapter_revision=plan.options.adapter_revision,
        output_dir=str(output_dir),
        base_dtype=dtype_name(plan.base.dominant_float_dtype()),
        output_dtype=dtype_name(plan.output_dtype),
        compute_dtype=plan.options.compute_dtype,
        device=plan.options.device,
        modules=modules,
        changed_tensors=changed,
        copied_tensors=sum(1 for t in plan.tensors if not t.changed),
        shards=shards,
        base_bytes=plan.base.nbytes,
        adapter_bytes=plan.adapter.nbytes,
        output_bytes=plan.output_nbytes,
        seconds={
            "total": elapsed,
            "read": ctx.timings.read,
            "math": ctx.timings.math,
            "write": ctx.timings.write,
            "copy": ctx.timings.copy,
            "sync": ctx.timings.sync,
        },
        notes=list(plan.notes),
        warnings=list(plan.warnings),
        config_changes=config_changes,
        adapter_config=dict(plan.adapter_config.raw),
    )


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    output_dir: str | Path,
    options: Optional[MergeOptions] = None,
    *,
    overwrite: bool = False,
    progress: ProgressCallback = no_progress,
) -> MergeReport:
    """Plan (validating everything from metadata) and then stream the merge into output_dir."""
    check_output_dir(Path(output_dir), overwrite)
    plan = build_plan(base, adapter, options)
    return execute_plan(plan, output_dir, overwrite=overwrite, progress=progress)


__all__ = ["merge_adapter", "execute_plan", "check_disk", "check_output_dir", "MergeError"]
