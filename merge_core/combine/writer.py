"""The combined adapter folder: a standard PEFT LoRA (weights + adapter_config.json) and its recipe beside it.

The recipe lives in merge_recipe.json, not in adapter_config.json: PEFT warns about every key
its LoraConfig does not know whenever the adapter is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..adapter import ADAPTER_CONFIG, ADAPTER_SAFETENSORS
from ..json_files import JsonFormatError, read_json_file
from .sources import PEFT_PREFIX, Source

RECIPE_FILE = "merge_recipe.json"


@dataclass
class CombinedAdapter:
    """What a combination produced, before it is written."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    semantics: str  # what the combination computes, in words, for the recipe
    notes: list[str] = field(default_factory=list)
    effective_type: str = ""  # what ran: PEFT uses "linear" for a single adapter whatever was asked
    parameters: dict[str, Any] = field(default_factory=dict)
    module_order: str = ""


def factor_keys(module: str, is_embedding: bool) -> tuple[str, str]:
    """The adapter keys of a module's a and b, as PEFT saves them."""
    if is_embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def padded(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b in float32 with zero rows of a / columns of b up to ``rank``: b @ a is unchanged."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    r = a.shape[0]
    if r == rank:
        return a.contiguous(), b.contiguous()
    a_out = torch.zeros((rank, a.shape[1]), dtype=torch.float32)
    b_out = torch.zeros((b.shape[0], rank), dtype=torch.float32)
    a_out[:r] = a
    b_out[:, :r] = b
    return a_out, b_out


def lora_config(
    sources: list[Source],
    *,
    r: int,
    use_rslora: bool,
    target_modules: Any,
    modules_to_save: list[str] | None,
    lora_bias: bool = False,
) -> dict[str, Any]:
    """adapter_config.json of the combined adapter (lora_alpha = r, so the scale is 1 unless rsLoRA)."""
    first = sources[0]
    return {
        "peft_type": "LORA",
        "task_type": first.config.task_type,
        "base_model_name_or_path": next(
            (s.config.base_model_name_or_path for s in sources if s.config.base_model_name_or_path), None
        ),
        "revision": next((s.config.revision for s in sources if s.config.revision), None),
        "r": int(r),
        "lora_alpha": int(r),
        "use_rslora": bool(use_rslora),
        "use_dora": False,
        "fan_in_fan_out": bool(first.config.fan_in_fan_out),
        "target_modules": target_modules,
        "modules_to_save": modules_to_save,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": bool(lora_bias),
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def recipe(sources: list[Source], combination_type: str, combined: CombinedAdapter) -> dict[str, Any]:
    """How the adapter was made: what the model card shows and a rerun needs."""
    effective = combined.effective_type or combination_type
    return {
        "combination_type": combination_type,
        **({"effective_combination_type": effective} if effective != combination_type else {}),
        "sources": [
            {
                "name": s.name,
                "path": str(s.path),
                "weight": s.weight,
                "r": s.config.r,
                "lora_alpha": s.config.lora_alpha,
                "use_rslora": s.config.use_rslora,
                "base_model_name_or_path": s.config.base_model_name_or_path,
            }
            for s in sources
        ],
        "weights": [s.weight for s in sources],
        "parameters": combined.parameters,
        "semantics": combined.semantics,
        "module_order": combined.module_order,
        "notes": combined.notes,
    }


def write(out_dir: Path, combined: CombinedAdapter, made_by: dict[str, Any]) -> None:
    """Each file written beside its final name and renamed into place, so none is ever half-written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {ADAPTER_CONFIG: combined.config, RECIPE_FILE: made_by}
    staged = {ADAPTER_SAFETENSORS: out_dir / f".{ADAPTER_SAFETENSORS}.tmp"}
    save_file(
        {k: v.contiguous() for k, v in combined.tensors.items()},
        str(staged[ADAPTER_SAFETENSORS]),
        metadata={"format": "pt"},
    )
    for name, content in texts.items():
        staged[name] = out_dir / f".{name}.tmp"
        staged[name].write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    for name, tmp in staged.items():
        os.replace(tmp, out_dir / name)


def read_recipe(adapter_dir: Path) -> dict[str, Any]:
    """The recipe of a combined adapter folder; an empty dict for any other adapter.

    An unreadable recipe also reads as empty: it only describes the merge and must never stop one.
    """
    try:
        data = read_json_file(Path(adapter_dir) / RECIPE_FILE)
    except (OSError, JsonFormatError):
        return {}
    return data if isinstance(data, dict) else {}
