"""What a merge into a quantized base produces: dequantized (default), original or requantized, and what it costs.

- dequantized: merge into dequantize(W), exactly what was trained; a plain model comes out.
- original: merge into the full-precision model the quantized repo was made from (its card's ``base_model``).
- requantized: the dequantized merge written back as bitsandbytes 4-/8-bit with the base's settings.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidOptionError
from .model_lock import building_models
from .verify_report import Check

if TYPE_CHECKING:
    from .inputs import ResolvedInputs
    from .plan_types import MergePlan

QUANT_TARGETS: dict[str, str] = {
    "dequantized": "merge into exactly what was trained (dequantize(W)); a plain model comes out (default)",
    "original": "merge into the full-precision model the quantized repo was made from (its card's base_model)",
    "requantized": "the dequantized merge written back as bitsandbytes 4-/8-bit with the base's own settings",
}
COST_ROW = "cost against the trained model"
_PROBE_SHAPE = (2, 16)


def check_target(target: str | None) -> str:
    """The target, validated (InvalidOptionError names the choices)."""
    value = (target or "dequantized").strip().lower()
    if value not in QUANT_TARGETS:
        raise InvalidOptionError(f"Unknown quantized-base target {target!r}; choose {', '.join(QUANT_TARGETS)}.")
    return value


def target_help() -> str:
    return "what a quantized base becomes: " + "; ".join(f"{k} = {v}" for k, v in QUANT_TARGETS.items())


def find_original_base(card: dict[str, Any], config: dict[str, Any], quantized_id: str) -> str | None:
    """The full-precision repo a quantized one was made from: its card's base_model, else config hints."""
    from .hub import is_repo_id

    declared = card.get("base_model")
    candidates = list(declared) if isinstance(declared, list) else [declared]
    candidates.append(config.get("_name_or_path"))
    for candidate in candidates:
        text = str(candidate or "").strip()
        if text and text != quantized_id and is_repo_id(text):
            return text
    return None


def requantize_in_place(output_dir: Path, settings: dict[str, Any]) -> None:
    """Replace the plain merged folder by its bitsandbytes checkpoint (written beside it, then swapped)."""
    from .quant import requantize

    staged = output_dir.with_name(output_dir.name + ".requantized-tmp")
    plain = output_dir.with_name(output_dir.name + ".plain-tmp")
    for leftover in (staged, plain):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        requantize(output_dir, staged, settings=settings)
        output_dir.rename(plain)
        staged.rename(output_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(plain, ignore_errors=True)


@dataclass
class QuantSummary:
    """What happened to a quantized base: for the summary, the verification table and the card."""

    quantized_base: str = ""  # the quantized repo or folder ("" for a plain base)
    method: str = ""  # e.g. "bitsandbytes 4-bit nf4"
    target: str = "dequantized"
    cost: str = ""  # the measured cost in plain words, "" when not measured
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def requantize_settings(plan: MergePlan, target: str) -> dict[str, Any] | None:
    """For the requantized target, the base's BitsAndBytesConfig fields; refused before any merge otherwise."""
    if target != "requantized":
        return None
    if plan.base.quant is None:
        raise InvalidOptionError(
            "The base is not quantized, so there is nothing to requantize to; use the default target."
        )
    from .quant import bnb_settings

    return bnb_settings(plan.base.quant)


def refuse_quantized_original(plan: MergePlan, inputs: ResolvedInputs) -> None:
    """Target original: the model merged into must be the full-precision one, not a quantized one again."""
    quant = plan.base.quant
    if inputs.quantized_base is None or quant is None or quant.config_only:
        return
    raise InvalidOptionError(
        f"The original base {inputs.base.name} is itself quantized ({quant.method}), so it is not the "
        "full-precision model to merge into; give that model with --original-base, or use the default target."
    )


def finish_target(
    plan: MergePlan,
    inputs: ResolvedInputs,
    output_dir: Path,
    *,
    target: str,
    settings: dict[str, Any] | None,
    fits: tuple[bool, str],
) -> QuantSummary:
    """Requantize when asked, then measure original/requantized against PeftModel on the quantized base."""
    quantized = inputs.quantized_base
    if quantized is not None:
        summary = QuantSummary(quantized.name, _describe(quantized.folder), target)
        quantized_dir = quantized.folder
    elif plan.base.quant is not None:
        summary = QuantSummary(inputs.base.name, plan.base.quant.describe(), target)
        quantized_dir = plan.base.path
        if original := find_original_base(inputs.base.card, plan.base.config, inputs.base.name):
            summary.notes.append(f"The quantized base was made from {original}; target 'original' merges into that.")
    else:
        return QuantSummary()
    if settings is not None:
        requantize_in_place(output_dir, settings)
        summary.notes.append(
            f"Written back as a bitsandbytes checkpoint with the base's settings ({_short(settings)}); the structure "
            "and numerics rows checked the plain merge before it was written back."
        )
    if target == "dequantized":
        return summary
    if not fits[0]:
        skipped = f"skipped: {fits[1] or 'run with --verify to measure it'}"
        summary.checks.append(Check(COST_ROW, "function", None, "-", "-", skipped))
        summary.notes.append(f"The {target} model's difference from the trained model was not measured.")
        return summary
    row = cost_row(output_dir, quantized_dir, inputs.adapter_dir, target=target)
    summary.checks.append(row)
    summary.cost = row.detail
    summary.notes.append(row.detail[:1].upper() + row.detail[1:] + ".")
    return summary


def _short(settings: dict[str, Any]) -> str:
    keys = (
        "load_in_4bit",
        "load_in_8bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype",
    )
    return ", ".join(f"{k}={settings[k]}" for k in keys if settings.get(k) not in (None, False))


def _describe(folder: Path) -> str:
    from .checkpoint import load_base_checkpoint

    try:
        quant = load_base_checkpoint(folder).quant
    except Exception:  # noqa: BLE001 - only words for the card; the weights were not needed
        return "quantized"
    return quant.describe() if quant is not None else "quantized"


def _without_dropout(model: Any) -> Any:
    # Train mode is what training computed on CPU (eval repacks bitsandbytes weights); dropout must not add noise.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.to(torch.float32)


def cost_row(output_dir: Path, quantized_dir: Path, adapter_dir: Path, *, target: str) -> Check:
    """Logits of the output against PeftModel on the quantized base (what was trained), as an informational row.

    Fails only when the output does not load; the numbers are the price of the chosen target.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        with building_models():
            output = _without_dropout(AutoModelForCausalLM.from_pretrained(output_dir, device_map="cpu", dtype="auto"))
    except Exception as exc:  # noqa: BLE001 - the finding is that it does not load
        first = (str(exc).strip().splitlines() or [""])[0][:140]
        return Check(COST_ROW, "function", False, "-", "-", f"the {target} output does not load ({first})")
    try:
        with building_models():
            quantized = AutoModelForCausalLM.from_pretrained(quantized_dir, device_map="cpu", dtype=torch.float32)
            trained = _without_dropout(PeftModel.from_pretrained(quantized, str(adapter_dir)))
    except Exception as exc:  # noqa: BLE001 - e.g. GPTQ/AWQ need a library (and often a GPU) this machine lacks
        first = (str(exc).strip().splitlines() or [""])[0][:140]
        skipped = f"skipped: the quantized base does not load here with PEFT ({first})"
        return Check(COST_ROW, "function", None, "-", "-", skipped)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(output.config.vocab_size), _PROBE_SHAPE, generator=generator)
    want, got = _logits(trained, ids), _logits(output, ids)
    agreement = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    diff = (want - got).abs().max().item()
    value = f"top-1 agreement {agreement:.1%}, max |logits diff| {diff:.3g}"
    detail = f"the {target} model differs from the trained model (PeftModel on the quantized base): {value}"
    return Check(COST_ROW, "function", None, value, "informational", detail)


__all__ = [
    "COST_ROW",
    "QUANT_TARGETS",
    "QuantSummary",
    "finish_target",
    "refuse_quantized_original",
    "requantize_settings",
    "check_target",
    "cost_row",
    "find_original_base",
    "requantize_in_place",
    "target_help",
]
