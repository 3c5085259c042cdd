"""Function checks: logits and greedy tokens of the merged model vs PeftModel(base, adapter)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from .plan import MergePlan
from .verify_report import Check


def functional_budget(plan: MergePlan, device: str = "cpu", memory_budget: Optional[int] = None) -> tuple[bool, str]:
    """Whether base+adapter and merged fit in memory together (both in float32)."""
    params = sum(math.prod(t.shape) for t in plan.tensors if t.dtype in ("F32", "F16", "BF16"))
    needed = params * 4 * 2 + plan.adapter.nbytes * 2 + (512 << 20)
    if memory_budget is None:
        if device.startswith("cuda") and torch.cuda.is_available():
            memory_budget = int(torch.cuda.mem_get_info()[0] * 0.8)
        else:
            import psutil

            memory_budget = int(psutil.virtual_memory().available * 0.6)
    if needed > memory_budget:
        return False, (f"needs about {needed / 1e9:.1f} GB to hold base+adapter and merged in float32, "
                       f"{memory_budget / 1e9:.1f} GB available; the streamed checks above cover every tensor")
    return True, ""


def functional_checks(plan: MergePlan, merged_dir: Path, *, device: str = "cpu", force: bool = False,
                      memory_budget: Optional[int] = None, models: Any = None) -> list[Check]:
    from .generate import load_models

    names = ["logits max abs diff vs PeftModel", "top-1 token agreement", "greedy continuation identical",
             "adapter changes the output"]
    fits, reason = functional_budget(plan, device, memory_budget)
    if not fits and not force and models is None:
        return [Check(n, "function", None, "-", "-", f"skipped: {reason}") for n in names]
    own = models is None
    if own:
        models = load_models(plan, merged_dir, device=device)
    try:
        return _logit_checks(models)
    finally:
        if own:
            models.release()


@torch.no_grad()
def _logit_checks(models: Any) -> list[Check]:
    gen = torch.Generator().manual_seed(1234)
    vocab = models.base_vocab
    ids = torch.randint(0, vocab, (2, 24), generator=gen).to(models.device)
    mask = torch.ones_like(ids)
    ref = models.peft(input_ids=ids, attention_mask=mask).logits.float()
    got = models.merged(input_ids=ids, attention_mask=mask).logits.float()
    with models.peft.disable_adapter():
        base = models.peft(input_ids=ids, attention_mask=mask).logits.float()
    diff = float((ref - got).abs().max())
    scale = float(ref.abs().max()) or 1.0
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    effect = float((base - ref).abs().max())
    # Rounding a 16-bit merged weight is a real (tiny) difference from the unmerged sum.
    low_precision = models.merged_dtype in (torch.float16, torch.bfloat16)
    limit = 2e-2 * scale if low_precision else 1e-3 * max(1.0, scale / 10)
    top1_needed = 0.95 if low_precision else 1.0
    new_tokens = 16
    greedy_kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=models.pad_token_id)
    a = models.peft.generate(input_ids=ids[:1], attention_mask=mask[:1], **greedy_kwargs)[0, ids.shape[1]:]
    b = models.merged.generate(input_ids=ids[:1], attention_mask=mask[:1], **greedy_kwargs)[0, ids.shape[1]:]
    same = int((a[: len(b)] == b[: len(a)]).sum())
    greedy_ok = same == len(a) == len(b) or (low_precision and same >= 0.75 * len(a))
    return [
        Check("logits max abs diff vs PeftModel", "function", diff <= limit, f"{diff:.3e}", f"<= {limit:.3e}",
              f"2 random prompts x 24 tokens; logits up to {scale:.2f}"),
        Check("top-1 token agreement", "function", top1 >= top1_needed, f"{top1:.2%}", f">= {top1_needed:.0%}"),
        Check("greedy continuation identical", "function", greedy_ok, f"{same}/{len(a)} tokens",
              "all" if not low_precision else ">= 75% (16-bit weights)"),
        Check("adapter changes the output", "function", effect > 0, f"{effect:.3e}", "> 0",
              "max |logits(base) - logits(base+adapter)|"),
    ]
