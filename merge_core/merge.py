"""The streaming merge: one output shard at a time, one row block of one tensor at a time.

Each output tensor is one of four kinds, each written by its own small function: a byte copy,
a dtype conversion, a low-rank delta (with DoRA's row rescaling), or DoRA on columns (two
passes). Every row block that is computed is checked to be finite after its one rounding.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .background_writer import BackgroundWriter, BlockRing
from .errors import InsufficientDiskError, NonFiniteOutputError, OutputWriteError, explain_os_error
from .options import MergeOptions, dtype_name
from .outputs import begin_staging, check_output_target, discard, publish
from .peft_types.ops import apply_all_
from .plan import MergePlan, OutputTensorPlan, build_plan
from .progress import ProgressCallback, ProgressUpdate, no_progress
from .read_ahead import BlockRead, ReadAhead
from .report import MergeReport
from .safetensors_io import DTYPE_FROM_ST, OpenFiles, StreamingWriter, element_size, fsync_tree
from .sources import row_alignment, start_rows
from .tensor_math import (
    ColumnNorms,
    LoadedDelta,
    Workspace,
    apply_deltas_,
    block_elements_for,
    dora_row_factor,
    finite_state,
    row_blocks,
    rows_per_block,
)
from .threads import merge_threads

# Room for config/tokenizer files and filesystem overhead on top of the weights.
_DISK_MARGIN_BYTES = 64 << 20


@dataclass
class Timings:
    """Seconds per phase, kept apart from the math so the functions below read as arithmetic."""

    seconds: dict[str, float] = field(
        default_factory=lambda: {"read": 0.0, "math": 0.0, "write": 0.0, "copy": 0.0, "sync": 0.0}
    )

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        import time

        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - began


@dataclass
class _Context:
    plan: MergePlan
    device: torch.device
    block_elements: int
    on_bytes: Callable[[int], None]
    workspace: Workspace
    files: OpenFiles = field(default_factory=OpenFiles)
    timings: Timings = field(default_factory=Timings)
    check_workspace: Workspace = field(default_factory=Workspace)  # the writer thread's own buffers
    reads: ReadAhead | None = None  # the current shard's row blocks, read ahead on a thread
    ring: BlockRing | None = None  # CPU merges: float64 blocks the writer thread rounds (see _emit)

    def rows(self, t: OutputTensorPlan, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of ``t``'s starting value; the time spent waiting for them is the "read" phase."""
        assert self.reads is not None
        with self.timings.phase("read"):
            return self.reads.next((t.name, a, b))

    def adapter_tensor(self, key: str, transpose: bool = False) -> torch.Tensor:
        t = self.plan.adapter.tensor(key).to(device=self.device, dtype=self.plan.compute_dtype)
        return t.T.contiguous() if transpose else t


def check_disk(directory: Path, needed: int, what: str = "the merged model") -> None:
    directory = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(directory).free
    if free < needed + _DISK_MARGIN_BYTES:
        raise InsufficientDiskError(
            f"Not enough disk space for {what}: it needs {(needed + _DISK_MARGIN_BYTES) / 1e9:.2f} GB "
            f"but only {free / 1e9:.2f} GB are free at {directory}. Free some space or choose another output folder."
        )


# --- the four kinds of output tensor -----------------------------------------------------------------


def _copy(ctx: _Context, writer: BackgroundWriter, t: OutputTensorPlan) -> None:
    assert t.base is not None
    with ctx.timings.phase("copy"):
        writer.copy_from(ctx.files.get(t.base.shard), t.base.info.begin, t.base.info.nbytes)
    ctx.on_bytes(t.base.info.nbytes)


def _step(ctx: _Context, t: OutputTensorPlan) -> int:
    """Rows per block: about ``block_elements``, a multiple of the quantization block height."""
    align = row_alignment(t)
    return max(align, rows_per_block(t.shape, ctx.block_elements) // align * align)


def _block_reads(ctx: _Context, shard: list[OutputTensorPlan]) -> Iterator[BlockRead]:
    """Every row block the shard's tensors read, in the order the executor asks for them."""
    for t in shard:
        if t.is_copy:
            continue
        step, n_rows = _step(ctx, t), (t.shape[0] if t.shape else 1)
        row_bytes = t.base.info.nbytes // max(1, n_rows) if t.base is not None and t.quantized is None else 0
        passes = 2 if t.changed and t.dora is not None and t.dora.axis == "col" else 1
        for _ in range(passes):
            for a, b in row_blocks(n_rows, step):
                yield BlockRead((t.name, a, b), (b - a) * row_bytes, _reader(ctx, t, a, b))


def _reader(ctx: _Context, t: OutputTensorPlan, a: int, b: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def read(buffer: torch.Tensor) -> torch.Tensor:
        return start_rows(t, base=ctx.plan.base, adapter=ctx.plan.adapter, files=ctx.files, buffer=buffer)(a, b)

    return read


def _emit(ctx: _Context, writer: BackgroundWriter, t: OutputTensorPlan, work: torch.Tensor, rows: range) -> None:
    """Round ``work`` once to the output dtype and queue it for the disk; the writer thread refuses Inf/NaN."""
    out_dtype = DTYPE_FROM_ST[t.dtype]
    check = _finite_check(ctx, t, rows)
    with ctx.timings.phase("write"):
        idle = ctx.ring.owns(work) if ctx.ring is not None else None
        if idle is not None:
            # The writer thread rounds the block straight into the file's buffers, overlapping our next block.
            writer.round_block(work, out_dtype, idle, check=check)
            ctx.on_bytes(work.numel() * element_size(t.dtype))
            return
        if work.device.type != "cpu":
            # Round on the accelerator: the copy back then moves 2 bytes per element, not 8.
            rounded = ctx.workspace.get("rounded", tuple(work.shape), out_dtype)
            rounded.copy_(work)
            staged = writer.write(rounded, out_dtype, check=check)
        else:
            staged = writer.write(work, out_dtype, check=check)
    ctx.on_bytes(staged.numel() * element_size(t.dtype))


def _finite_check(ctx: _Context, t: OutputTensorPlan, rows: range):
    """The check the writer thread runs on a rounded block (it alone uses ``check_workspace``)."""

    def check(staged: torch.Tensor) -> None:
        state = finite_state(staged, ctx.check_workspace)
        if state != "finite":
            raise NonFiniteOutputError(_non_finite_message(t, rows, state))

    return check


def _non_finite_message(t: OutputTensorPlan, rows: range, state: str) -> str:
    where = f"The merged tensor {t.name} (rows {rows.start}-{rows.stop - 1})"
    if state == "nan":
        return (
            f"{where} contains NaN, so nothing was written; the base or the adapter holds invalid values there: "
            "check both files."
        )
    limit = torch.finfo(DTYPE_FROM_ST[t.dtype]).max
    hint = (
        "choose bfloat16 output, which has float32's range"
        if t.dtype == "F16"
        else "check the adapter's scale (lora_alpha / r), which is implausibly large"
    )
    return f"{where} goes beyond {dtype_name(t.dtype)}'s largest value {limit:.4g}, so nothing was written; {hint}."


def _convert(ctx: _Context, writer: BackgroundWriter, t: OutputTensorPlan, step: int) -> None:
    for a, b in row_blocks(t.shape[0] if t.shape else 1, step):
        _emit(ctx, writer, t, ctx.rows(t, a, b), range(a, b))


@dataclass
class _DeltaMath:
    """The exact value of rows [a, b): start widened to the compute dtype plus every delta."""

    ctx: _Context
    t: OutputTensorPlan

    def __post_init__(self) -> None:
        ctx, t = self.ctx, self.t
        self.deltas = [
            LoadedDelta(
                ctx.adapter_tensor(d.left_key, d.left_transpose),
                ctx.adapter_tensor(d.right_key, d.right_transpose),
                d.scale,
            )
            for d in t.deltas
        ]
        self.bias_deltas = [(ctx.adapter_tensor(key).reshape(-1), scale) for key, scale in t.bias_deltas]
        self.magnitude = ctx.adapter_tensor(t.dora.magnitude_key).reshape(-1) if t.dora else None
        self.ops = self._load_ops() if t.ops else []

    def _load_ops(self) -> list:
        from .peft_types import load_ops

        return load_ops(
            self.t.ops,
            self.ctx.plan.adapter.tensor,
            device=self.ctx.device,
            dtype=self.ctx.plan.compute_dtype,
            read_base=lambda: self._whole().to(self.ctx.device, self.ctx.plan.compute_dtype),
        )

    def _whole(self) -> torch.Tensor:
        """The whole starting tensor, read here (positional reads: the read-ahead thread may share the file)."""
        plan, n_rows = self.ctx.plan, self.t.shape[0] if self.t.shape else 1
        return start_rows(self.t, base=plan.base, adapter=plan.adapter, files=self.ctx.files)(0, n_rows)

    def rows(self, a: int, b: int) -> torch.Tensor:
        ctx, shape = self.ctx, (b - a, *self.t.shape[1:]) if self.t.shape else ()
        start = ctx.rows(self.t, a, b)
        with ctx.timings.phase("math"):
            if ctx.ring is not None:
                work = ctx.ring.next(shape, ctx.plan.compute_dtype)
            else:
                work = ctx.workspace.get("work", shape, ctx.plan.compute_dtype)
            if work.device.type != "cpu":
                # Move the stored dtype (2 bytes/element), widen on the accelerator.
                staged = ctx.workspace.get("start", shape, start.dtype)
                staged.copy_(start)
                start = staged
            work.copy_(start)
            work = apply_deltas_(work, a, self.deltas, self.bias_deltas)
            return apply_all_(work, a, self.ops) if self.ops else work


def _low_rank(ctx: _Context, writer: BackgroundWriter, t: OutputTensorPlan, step: int) -> None:
    """W + sum(scale * L @ R) (+ bias), and DoRA's per-row rescaling for Linear layers."""
    math_ = _DeltaMath(ctx, t)
    for a, b in row_blocks(t.shape[0] if t.shape else 1, step):
        work = math_.rows(a, b)
        if math_.magnitude is not None:
            with ctx.timings.phase("math"):
                work.mul_(dora_row_factor(work, math_.magnitude[a:b]))
        _emit(ctx, writer, t, work, range(a, b))


def _dora_columns(ctx: _Context, writer: BackgroundWriter, t: OutputTensorPlan, step: int) -> None:
    """DoRA on Conv1D and Embedding: column norms of W + delta over all rows first, then rescale."""
    math_ = _DeltaMath(ctx, t)
    assert math_.magnitude is not None
    n_rows = t.shape[0]
    norms = ColumnNorms()
    for a, b in row_blocks(n_rows, step):
        norms.add(math_.rows(a, b))
    factor = norms.factor(math_.magnitude)
    for a, b in row_blocks(n_rows, step):
        work = math_.rows(a, b)
        with ctx.timings.phase("math"):
            work.mul_(factor)
        _emit(ctx, writer, t, work, range(a, b))


def _write_tensor(ctx: _Context, writer: BackgroundWriter, t: OutputTensorPlan) -> None:
    writer.begin(t.name)
    if t.is_copy:
        _copy(ctx, writer, t)
        return
    step = _step(ctx, t)
    if not t.changed:
        _convert(ctx, writer, t, step)
    elif t.dora is not None and t.dora.axis == "col":
        _dora_columns(ctx, writer, t, step)
    else:
        _low_rank(ctx, writer, t, step)


# --- the folder ----------------------------------------------------------------------------------------


@dataclass
class ShardHooks:
    """Called around each output shard, for a pipeline that streams: ``before(i, tensors)`` may fetch the
    base shards those tensors read; ``after(i, path)`` may hand the finished shard on (upload it) and drop
    the inputs it consumed. The executor's open base files are closed before ``after`` runs."""

    before: Callable[[int, list[OutputTensorPlan]], None] = lambda index, tensors: None
    after: Callable[[int, Path], None] = lambda index, path: None


def _write_folder(ctx: _Context, folder: Path, hooks: ShardHooks) -> list[str]:
    plan = ctx.plan
    names = plan.shard_names()
    weight_map: dict[str, str] = {}
    for index, (shard_name, shard) in enumerate(zip(names, plan.shards, strict=True)):
        hooks.before(index, shard)
        writer = StreamingWriter(folder / shard_name, [t.planned() for t in shard], {"format": "pt"})
        with BackgroundWriter(writer) as background, ReadAhead(_block_reads(ctx, shard)) as ctx.reads:
            for t in shard:
                _write_tensor(ctx, background, t)
                weight_map[t.name] = shard_name
        ctx.reads = None
        ctx.files.close()
        hooks.after(index, folder / shard_name)
    if len(names) > 1:
        index = {"metadata": {"total_size": plan.output_nbytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    for name, src in plan.copy_files.items():
        shutil.copyfile(src, folder / name)
    with ctx.timings.phase("sync"):
        fsync_tree(folder)
    return names


def protected_inputs(plan: MergePlan) -> list[tuple[str, Path]]:
    """The folders an output must stay clear of: both inputs, and where their files really live."""
    protected = [("the base model", plan.base.path), ("the adapter", plan.adapter.path)]
    real_dirs = {Path(shard).resolve().parent for shard in plan.base.shards}
    real_dirs.add(plan.adapter.file.resolve().parent)
    protected += [("a folder holding the inputs' files", d) for d in sorted(real_dirs)]
    return protected


def execute_plan(
    plan: MergePlan,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: ProgressCallback = no_progress,
    block_elements: int | None = None,
    hooks: ShardHooks | None = None,
    check_space: bool = True,
) -> MergeReport:
    """Write the merged model into output_dir, atomically: all of it or nothing.

    ``check_space=False`` for a pipeline whose hooks move each finished shard away (it checks its own budget).
    ``block_elements`` (elements per row block) defaults to the device's (tensor_math.block_elements_for).
    """
    import time

    output_dir = check_output_target(output_dir, protected=protected_inputs(plan), overwrite=overwrite)
    total, done = plan.output_nbytes, [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        progress(ProgressUpdate("merge", done[0], total, "B"))

    device = torch.device(plan.options.device)
    ctx = _Context(plan, device, block_elements or block_elements_for(device), on_bytes, Workspace(device))
    ctx.ring = BlockRing(device) if device.type == "cpu" else None
    started = time.perf_counter()
    # Staging first: an unwritable location is then reported as such, not as a lack of space.
    staging = begin_staging(output_dir)
    try:
        if check_space:
            check_disk(output_dir.parent, plan.output_nbytes)
        progress(ProgressUpdate("merge", 0, total, "B", "starting"))
        with merge_threads(device):
            names = _write_folder(ctx, staging.folder, hooks or ShardHooks())
        publish(staging, output_dir)
    except OSError as exc:
        discard(staging)
        raise OutputWriteError(explain_os_error(exc, "write the merged model to", output_dir)) from exc
    except BaseException:
        discard(staging)
        raise
    finally:
        staging.release()
        ctx.files.close()
    return _report(plan, output_dir, names, ctx.timings, time.perf_counter() - started)


def _report(plan: MergePlan, output_dir: Path, shards: list[str], timings: Timings, elapsed: float) -> MergeReport:
    from .combine import read_recipe

    config_changes = {k: v for k, v in plan.config.items() if plan.base.config.get(k) != v and k != "text_config"}
    return MergeReport(
        base=plan.options.base_name or plan.base.display_name,
        adapter=plan.options.adapter_name or str(plan.adapter.path),
        adapter_revision=plan.options.adapter_revision,
        output_dir=str(output_dir),
        base_dtype=dtype_name(plan.base.dominant_float_dtype()),
        output_dtype=dtype_name(plan.output_dtype),
        compute_dtype=plan.options.compute_dtype,
        device=plan.options.device,
        modules=list(plan.modules),
        changed_tensors=[t.name for t in plan.tensors if t.changed],
        copied_tensors=sum(1 for t in plan.tensors if not t.changed),
        shards=shards,
        base_bytes=plan.base.nbytes,
        adapter_bytes=plan.adapter.nbytes,
        output_bytes=plan.output_nbytes,
        seconds={"total": elapsed, **timings.seconds},
        notes=list(plan.notes),
        warnings=list(plan.warnings),
        config_changes=config_changes,
        adapter_config=dict(plan.adapter_config.raw),
        recipe=read_recipe(plan.adapter.path),
    )


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    output_dir: str | Path,
    options: MergeOptions | None = None,
    *,
    overwrite: bool = False,
    progress: ProgressCallback = no_progress,
) -> MergeReport:
    """Plan (validating everything from metadata) and then stream the merge into output_dir."""
    protected = [("the base model", Path(base)), ("the adapter", Path(adapter))]
    check_output_target(output_dir, protected=protected, overwrite=overwrite)
    plan = build_plan(base, adapter, options)
    return execute_plan(plan, output_dir, overwrite=overwrite, progress=progress)


__all__ = ["ShardHooks", "check_disk", "execute_plan", "merge_adapter", "protected_inputs"]
