"""A verification table that proves a merge, computed from the files on disk.

Three groups of checks:
- structure: every tensor present with its shape and dtype, no LoRA keys, only the
  expected tensors changed (the rest byte-identical to the base), no NaN/Inf, files load;
- numerics: each merged tensor against an independent float64 reference
  (W + scale * B @ A, or the DoRA formula) rounded once, and a random-probe check
  W'x vs Wx + scale * B(Ax) that never forms B @ A;
- function: logits and greedy tokens of the merged model vs PeftModel(base, adapter)
  unmerged, when both fit the memory budget (otherwise the table says why it was skipped).

Everything but the last streams row blocks, so it runs in about one block of memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .plan import MergePlan, ModulePlan, OutputTensorPlan, dtype_name
from .progress import ProgressCallback, ProgressUpdate, no_progress
from .safetensors_io import OpenFiles, SafetensorsFormatError, TensorInfo, read_header, read_rows
from .sources import start_rows
from .tensor_math import DEFAULT_BLOCK_ELEMENTS, row_blocks, rows_per_block
from .verify_function import functional_budget, functional_checks
from .verify_numerics import RowRanges, verify_changed
from .verify_report import Check, ModuleNumerics, VerificationReport

# Unit roundoff of each output dtype: the largest relative error of one correct rounding.
UNIT_ROUNDOFF = {"F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8, "F64": 2.0**-53}
_LORA_MARKERS = ("lora_", "modules_to_save", "original_module", ".base_layer.")


def merged_tensors(merged_dir: Path) -> tuple[dict[str, tuple[Path, TensorInfo]], list[str]]:
    """Tensor locations of the merged checkpoint, and problems with its index (if any)."""
    problems: list[str] = []
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted({merged_dir / n for n in weight_map.values()})
    else:
        weight_map = {}
        shards = [merged_dir / "model.safetensors"]
    found: dict[str, tuple[Path, TensorInfo]] = {}
    for shard in shards:
        if not shard.is_file():
            problems.append(f"missing shard {shard.name}")
            continue
        try:
            header = read_header(shard)
        except SafetensorsFormatError as exc:
            problems.append(str(exc))
            continue
        for name, info in header.tensors.items():
            found[name] = (shard, info)
            if weight_map and weight_map.get(name) != shard.name:
                problems.append(f"index maps {name} to {weight_map.get(name)}, found in {shard.name}")
    return found, problems


# --- the checks ----------------------------------------------------------------------------------


@dataclass
class _Found:
    """The merged folder's tensors, and which of them the structure checks already rejected."""

    tensors: dict[str, tuple[Path, TensorInfo]]
    problems: list[str]
    rejected: set[str] = field(default_factory=set)


def _structure_checks(plan: MergePlan, found: _Found) -> list[Check]:
    expected = {t.name: t for t in plan.tensors}
    tensors = found.tensors
    lora_keys = [n for n in tensors if any(m in n for m in _LORA_MARKERS)]
    missing = [n for n in expected if n not in tensors]
    wrong_shape = [n for n, t in expected.items() if n in tensors and tensors[n][1].shape != t.shape]
    extra = [n for n in tensors if n not in expected]
    wrong_dtype = [n for n, t in expected.items() if n in tensors and tensors[n][1].dtype != t.dtype]
    found.rejected = set(wrong_shape) | set(wrong_dtype)
    details = [
        *(f"missing {n}" for n in missing[:3]),
        *(f"shape {n}" for n in wrong_shape[:3]),
        *(f"unexpected {n}" for n in extra[:3]),
        *found.problems[:3],
    ]
    return [
        Check(
            "no adapter keys left", "structure", not lora_keys, f"{len(lora_keys)} found", "0", ", ".join(lora_keys[:3])
        ),
        Check(
            "all tensors present with their shapes",
            "structure",
            not (missing or wrong_shape or extra or found.problems),
            f"{len(tensors)}/{len(expected)} present, {len(wrong_shape)} wrong shape, {len(extra)} unexpected",
            f"{len(expected)} present, 0 wrong",
            "; ".join(details),
        ),
        Check(
            "dtype as asked",
            "structure",
            not wrong_dtype,
            f"{len(wrong_dtype)} tensors differ",
            f"all floating tensors {dtype_name(plan.output_dtype)}",
            ", ".join(wrong_dtype[:3]),
        ),
    ]


@dataclass
class _Findings:
    changed_unexpectedly: list[str] = field(default_factory=list)
    unchanged_unexpectedly: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    modules: list[ModuleNumerics] = field(default_factory=list)

    def checks(self) -> list[Check]:
        changed, unchanged, nonfinite = self.changed_unexpectedly, self.unchanged_unexpectedly, self.nonfinite
        return [
            Check(
                "untouched tensors bit-identical to base",
                "structure",
                not changed,
                f"{len(changed)} changed",
                "0 changed",
                ", ".join(changed[:3]),
            ),
            Check(
                "every adapted tensor changed",
                "structure",
                not unchanged,
                f"{len(unchanged)} unchanged",
                "0 unchanged",
                ", ".join(unchanged[:3]),
            ),
            Check("no NaN/Inf", "structure", not nonfinite, f"{len(nonfinite)} tensors", "0", ", ".join(nonfinite[:3])),
        ]


def _check_unchanged(
    plan: MergePlan,
    t: OutputTensorPlan,
    out_file: BinaryIO,
    info: TensorInfo,
    files: OpenFiles,
    block_elements: int,
    findings: _Findings,
    rows: RowRanges = row_blocks,
) -> None:
    """Tensors without a delta: finite, and (when not replaced) equal to the base, rounded once, bit for bit."""
    step = rows_per_block(t.shape, block_elements)
    source = start_rows(t, base=plan.base, adapter=plan.adapter, files=files)
    for a, b in rows(t.shape[0] if t.shape else 1, step):
        out = read_rows(out_file, info, a, b)
        wide = out if out.element_size() > 1 else out.float()  # torch has no float8 isfinite on the CPU
        if out.is_floating_point() and not bool(torch.isfinite(wide).all()):
            findings.nonfinite.append(t.name)
            return
        if t.changed:
            continue
        src = source(a, b)
        if src.dtype != out.dtype:
            src = src.double().to(out.dtype)
        if not torch.equal(out.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)):
            findings.changed_unexpectedly.append(t.name)
            return


def _stream_tensors(
    plan: MergePlan,
    found: _Found,
    *,
    block_elements: int,
    progress: ProgressCallback,
    rows: RowRanges = row_blocks,
) -> _Findings:
    """One pass over every merged tensor (or the ``rows`` ranges of each): the numerics of changed ones,
    identity and finiteness of the rest."""
    by_tensor: dict[str, list[ModulePlan]] = {}
    for m in plan.modules:
        by_tensor.setdefault(m.tensor, []).append(m)
    findings, files = _Findings(), OpenFiles()
    total_bytes, done = sum(t.planned().nbytes for t in plan.tensors), 0
    try:
        for i, t in enumerate(plan.tensors):
            if t.name not in found.tensors or t.name in found.rejected:
                continue
            shard, info = found.tensors[t.name]
            modules = by_tensor.get(t.name, [])
            if (t.changed and any(m.kind != "replaced" for m in modules)) or t.bias_deltas or t.ops:
                checked = verify_changed(
                    plan, t, modules, files.get(shard), info, files, block_elements, seed=i, rows=rows
                )
                findings.modules.append(checked.numerics)
                if checked.identical_to_start:
                    findings.unchanged_unexpectedly.append(t.name)
                if checked.nonfinite:
                    findings.nonfinite.append(t.name)
            else:
                _check_unchanged(plan, t, files.get(shard), info, files, block_elements, findings, rows=rows)
            done += t.planned().nbytes
            progress(ProgressUpdate("verify", done, total_bytes, "B"))
    finally:
        files.close()
    return findings


def _numerics_checks(plan: MergePlan, modules: list[ModuleNumerics]) -> list[Check]:
    if not modules:
        return [
            Check(
                "merged = float64 reference rounded once",
                "numerics",
                None,
                "-",
                "-",
                "no low-rank delta in this adapter",
            )
        ]
    u = UNIT_ROUNDOFF.get(plan.output_dtype, 2.0**-8)
    worst_bits = min(modules, key=lambda m: m.bitwise_fraction)
    bit_threshold = 1.0 if plan.options.compute_dtype == "float64" else 0.99
    worst_rel = max(modules, key=lambda m: m.relative_error)
    worst_probe = max(modules, key=lambda m: m.probe_error)
    return [
        Check(
            "merged = float64 reference rounded once",
            "numerics",
            worst_bits.bitwise_fraction >= bit_threshold,
            f"{worst_bits.bitwise_fraction:.6%} (worst: {worst_bits.tensor})",
            f">= {bit_threshold:.0%} of elements bitwise",
            f"{len(modules)} tensors checked",
        ),
        Check(
            "relative error vs float64 reference",
            "numerics",
            worst_rel.relative_error <= u,
            f"{worst_rel.relative_error:.3e} (worst: {worst_rel.tensor})",
            f"<= {u:.3e} (one rounding)",
        ),
        Check(
            "random probe W'x vs Wx + s·B(Ax)",
            "numerics",
            worst_probe.probe_error <= 4 * u,
            f"{worst_probe.probe_error:.3e} (worst: {worst_probe.tensor})",
            f"<= {4 * u:.3e}",
        ),
    ]


def verify_merge(
    plan: MergePlan,
    merged_dir: str | Path,
    *,
    functional: str = "auto",
    device: str = "cpu",
    progress: ProgressCallback = no_progress,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    memory_budget: int | None = None,
) -> VerificationReport:
    """Check the merged folder against the plan, the base and the adapter."""
    merged_dir = Path(merged_dir)
    found = _Found(*merged_tensors(merged_dir))
    report = VerificationReport(checks=_structure_checks(plan, found))
    findings = _stream_tensors(plan, found, block_elements=block_elements, progress=progress)
    report.modules = findings.modules
    report.checks += [*findings.checks(), _files_check(plan, merged_dir), *_numerics_checks(plan, findings.modules)]
    if functional != "never":
        report.checks += functional_checks(
            plan, merged_dir, device=device, force=functional == "always", memory_budget=memory_budget
        )
    return report


def _vocab_problems(plan: MergePlan, config: Any) -> list[str]:
    """The merged config's vocab_size keeps the base's relation to the embedding rows (equal, or Mllama's +8)."""
    text = plan.base.text_config()
    vocab = getattr(getattr(config, "text_config", None) or config, "vocab_size", None)
    for t in plan.tensors:
        base = plan.base.tensors.get(t.name)
        if base is None or not t.name.endswith(("embed_tokens.weight", "wte.weight")) or not base.info.shape:
            continue
        if isinstance(text.get("vocab_size"), int) and isinstance(vocab, int):
            if t.shape[0] - vocab != base.info.shape[0] - text["vocab_size"]:
                return [f"config vocab_size {vocab} does not follow the embedding's {t.shape[0]} rows"]
    return []


def _files_check(plan: MergePlan, merged_dir: Path) -> Check:
    names = ["config.json", *plan.copy_files]
    missing = [n for n in names if not (merged_dir / n).is_file()]
    problems: list[str] = []
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(merged_dir)
        problems += _vocab_problems(plan, config)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        problems.append(f"config.json does not load: {exc}")
    if any(n in plan.copy_files for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(merged_dir)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"tokenizer does not load: {str(exc)[:200]}")
    ok = not missing and not problems
    return Check(
        "config and tokenizer files present and loadable",
        "structure",
        ok,
        f"{len(names) - len(missing)}/{len(names)} files" + (", loads" if not problems else ""),
        "all present, all load",
        "; ".join([*(f"missing {m}" for m in missing), *problems]),
    )


__all__ = [
    "Check",
    "ModuleNumerics",
    "VerificationReport",
    "functional_budget",
    "functional_checks",
    "merged_tensors",
    "verify_merge",
]
