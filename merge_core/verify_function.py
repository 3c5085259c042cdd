"""Function checks: outputs of the merged model vs PeftModel(base, adapter), following the adapter's task.

Causal LMs and VLMs compare logits and greedy tokens, seq2seq models (text or speech) decoder logits
and greedy decoding, classifiers the head's logits and predicted labels, feature extractors hidden
states and embedding cosine similarity (see tasks.py). A check that cannot run says why in its row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .layer_stream import STREAMED_TASKS, streamed_logit_checks
from .models import (
    LoadedModels,
    MemoryFit,
    MergedModelLoadError,
    choose_model_class,
    free_memory,
    load_models,
    memory_fit,
    models_bytes,
    short_error,
)
from .plan import MergePlan
from .tasks import LOGIT_ROWS, ProbeInputError, row_names, task_checks
from .verify_report import Check


def functional_budget(plan: MergePlan, device: str = "cpu", memory_budget: int | None = None) -> tuple[bool, str]:
    """Whether base+adapter and merged fit in memory together (both in float32); ``memory_budget`` stands
    for the device's free bytes (default: measured, models.free_memory)."""
    fit = model_memory(plan, device, memory_budget)
    if not fit.fits:
        return False, f"{fit.sentence()}; the streamed checks above cover every tensor"
    return True, ""


def model_memory(plan: MergePlan, device: str = "cpu", free: int | None = None) -> MemoryFit:
    """The memory decision for loading base + adapter and the merged model of ``plan`` on ``device``."""
    params = sum(math.prod(t.shape) for t in plan.tensors if t.dtype in ("F32", "F16", "BF16"))
    needed = models_bytes(params, plan.adapter.nbytes)
    return memory_fit(needed, device=device, free=free_memory(device) if free is None else free)


def functional_checks(
    plan: MergePlan,
    merged_dir: Path,
    *,
    device: str = "cpu",
    force: bool = False,
    memory_budget: int | None = None,
    models: Any = None,
) -> list[Check]:
    """The function rows for the adapter's task; skipped rows with one short reason when they cannot run."""
    fits, reason = functional_budget(plan, device, memory_budget)
    if not fits and not force and models is None:
        if _planned_task(plan) in STREAMED_TASKS:
            return _streamed(plan, merged_dir, device=device, reason=reason)
        return _skipped(_planned_rows(plan), reason)
    own = models is None
    if own:
        try:
            models = load_models(plan, merged_dir, device=device)
        except MergedModelLoadError as exc:
            return _merged_does_not_load(_planned_rows(plan), str(exc))
        except ModelLoadError as exc:
            return _skipped(_planned_rows(plan), str(exc))
    loaded = _as_loaded(models)
    try:
        return task_checks(loaded)
    except ProbeInputError as exc:
        return _skipped(row_names(loaded.task), f"{exc}; the streamed checks above still cover every tensor")
    except Exception as exc:  # noqa: BLE001 - transformers' text is long; the row gets one short reason
        return _skipped(row_names(loaded.task), f"the {loaded.task} forward pass failed ({short_error(exc)})")
    finally:
        if own:
            models.release()


def _streamed(plan: MergePlan, merged_dir: Path, *, device: str, reason: str) -> list[Check]:
    """The causal-LM rows computed one layer at a time, for models too large to hold whole."""
    why = reason.split(";")[0]
    try:
        return streamed_logit_checks(plan, merged_dir, device=device, why=why)
    except MergedModelLoadError as exc:
        return _merged_does_not_load(LOGIT_ROWS, str(exc))
    except ModelLoadError as exc:
        return _skipped(LOGIT_ROWS, f"{why}, and {str(exc)[:1].lower()}{str(exc)[1:]}")
    except Exception as exc:  # noqa: BLE001 - transformers' text is long; the row gets one short reason
        return _skipped(LOGIT_ROWS, f"{why}, and the layer-by-layer forward pass failed ({short_error(exc)})")


def _planned_task(plan: MergePlan) -> str | None:
    try:
        return choose_model_class(plan).task
    except ModelLoadError:
        return None


def _planned_rows(plan: MergePlan) -> list[str]:
    """The rows the task would have, decided from metadata alone (nothing loaded)."""
    try:
        return row_names(choose_model_class(plan).task)
    except ModelLoadError:
        return LOGIT_ROWS


def _skipped(names: list[str], reason: str) -> list[Check]:
    if not reason.startswith("skipped"):
        # "The merged checkpoint ..." reads as "skipped: the merged checkpoint ..."; "PEFT ..." stays.
        reason = f"skipped: {reason[:1].lower() + reason[1:] if reason[1:2].islower() else reason}"
    return [Check(n, "function", None, "-", "-", reason) for n in names]


def _merged_does_not_load(names: list[str], reason: str) -> list[Check]:
    """base + adapter loaded, the merged folder did not: that is a finding about the merge, so it fails."""
    first = Check(names[0], "function", False, "does not load", "loads", reason)
    return [first, *_skipped(names[1:], "the merged model does not load (see above)")]


def _as_loaded(models: Any) -> LoadedModels:
    """Models loaded by an older loader (no task): a causal LM, as that loader always loaded."""
    if isinstance(models, LoadedModels):
        return models
    return LoadedModels(
        models.peft,
        models.merged,
        models.tokenizer,
        models.device,
        models.merged_dtype,
        models.base_vocab,
        models.pad_token_id,
        task=getattr(models, "task", "CAUSAL_LM"),
        model_class=type(models.merged).__name__,
    )
