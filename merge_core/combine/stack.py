"""The "stack" type: the exact sum of the adapters' own deltas, each times its weight.

W' = W + sum_i weight_i * scale_i * b_i @ a_i, what PEFT computes when the adapters are loaded
side by side and all merged. Written as one concatenated LoRA (a = cat_i(a_i * weight_i *
scale_i), b = cat_i(b_i), scale 1), so it is exact for any ranks and any target modules, and it
carries modules_to_save and lora_bias over.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CombinationArgumentError
from .replay import NOT_NEEDED, heuristic_key
from .sources import PEFT_PREFIX, Source, collect_replacements
from .validate import check_common, check_modules_to_save_conflicts, restrictions
from .writer import CombinedAdapter, factor_keys, lora_config, padded

SEMANTICS = "sum of the adapters' deltas, each times its weight"


def stack(sources: list[Source]) -> CombinedAdapter:
    """The stacked adapter of the sources of non-zero weight; the others are only named in a note."""
    # Weight 0 leaves an adapter out entirely (its LoRA and its modules_to_save), so it is not
    # checked either: "pick one of three" works whatever the other two are.
    active = [s for s in sources if s.weight != 0.0]
    if not active:
        raise CombinationArgumentError(
            "Every adapter has weight 0, so the combination would change nothing; "
            "give at least one adapter a non-zero weight."
        )
    for s in active:
        s.tensors.check_finite()
    shapes = check_common(active)
    notes: list[str] = []
    left_out = [s.name for s in sources if s.weight == 0.0]
    if left_out:
        notes.append(f"Left out (weight 0), including their modules_to_save: {', '.join(left_out)}.")
    check_modules_to_save_conflicts(active, "stack")
    tensors, _ = collect_replacements(active, keep_modules_to_save=True)
    modules = sorted({m for s in active for m in s.tensors.lora_modules}, key=heuristic_key)
    rank = max(sum(s.tensors.specs[s.tensors.lora_modules[m].a].shape[0] for s in _on(active, m)) for m in modules)
    biases: dict[str, torch.Tensor | None] = {}
    for m in modules:
        a, b, biases[m] = _stacked_module(active, m)
        key_a, key_b = factor_keys(m, shapes[m].is_embedding)
        tensors[key_a], tensors[key_b] = padded(a, b, rank)
    use_bias = any(bias is not None for bias in biases.values())
    for m, bias in biases.items() if use_bias else ():
        # With lora_bias on, PEFT saves a lora_B bias for every module; a module no source trained one for gets
        # zeros, which is what it adds (the merge refuses a lora_bias adapter that lacks one).
        out_features = tensors[factor_keys(m, shapes[m].is_embedding)[1]].shape[0]
        tensors[f"{PEFT_PREFIX}{m}.lora_B.bias"] = (
            bias if bias is not None else torch.zeros(out_features)
        ).contiguous()
    config = lora_config(
        active,
        r=rank,
        use_rslora=False,
        target_modules=_target_modules(active, modules),
        modules_to_save=_modules_to_save(active) or None,
        lora_bias=use_bias,
    )
    config["task_type"] = next((s.config.task_type for s in active if s.config.task_type), active[0].config.task_type)
    return CombinedAdapter(tensors, config, SEMANTICS, notes, "stack", {}, NOT_NEEDED)


def _on(sources: list[Source], module: str) -> list[Source]:
    return [s for s in sources if module in s.tensors.lora_modules]


def _stacked_module(active: list[Source], module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a, b, lora_B bias or None) of one module: every adapter's factors side by side."""
    parts_a, parts_b, bias = [], [], None
    for s in _on(active, module):
        a, b = s.factors(module)
        scale = s.scale(module)
        parts_a.append(a * s.weight * scale)  # the very expression of PEFT's "cat"
        parts_b.append(b)
        b_bias = s.tensors.lora_modules[module].b_bias
        if b_bias is not None:
            term = s.tensors.tensor(b_bias).to(torch.float32) * s.weight * scale
            bias = term if bias is None else bias + term
    return torch.cat(parts_a, dim=0), torch.cat(parts_b, dim=1), bias


def _target_modules(active: list[Source], modules: list[str]) -> Any:
    plain_lists = all(isinstance(s.config.target_modules, (list, tuple)) for s in active)
    if plain_lists and all(restrictions(s) == (None, None, None) for s in active):
        return sorted({str(t) for s in active for t in s.config.target_modules})  # type: ignore[union-attr]
    # Regexes or layer restrictions: name exactly the modules that carry weights.
    return sorted(modules)


def _modules_to_save(active: list[Source]) -> list[str]:
    return list(dict.fromkeys(n for s in active for n in s.modules_to_save))
