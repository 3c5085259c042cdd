"""Combine several PEFT LoRA adapters into ONE standard PEFT LoRA adapter folder.

The merge engine merges one adapter folder into a base model. To merge several adapters we
first turn them into one adapter whose merge is exactly the wanted combination; planning,
merging, verification and the PeftModel comparison then work unchanged on that folder.

Where each part lives:

- types: one record per combination type (what it needs) and the options
- sources: loading the adapters; validate: the checks across them and of the options
- stack: our exact sum; weighted + peft_ops: PEFT's add_weighted_adapter types
- replay: PEFT's module order and random draws (dare_* parity); writer: the folder and its recipe
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from .errors import (
    CombinationArgumentError,
    DifferentBaseModelsError,
    IncompatibleAdaptersError,
    UnknownCombinationTypeError,
    UnsupportedCombinationError,
)
from .sources import AdapterSource, load_sources, same_path
from .stack import stack
from .types import COMBINATION_TYPES, CombinationOptions, CombinationType, lookup
from .weighted import peft_combination
from .writer import RECIPE_FILE, read_recipe, recipe, write


def combine_adapters(
    sources: Sequence[AdapterSource | Path],
    combination_type: str | CombinationType,
    out_dir: Path,
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = 0,
    weights: Sequence[float] | None = None,
    base_model_dir: Path | None = None,
) -> Path:
    """Write ONE PEFT LoRA adapter folder (``out_dir``) that merges to the combination of ``sources``.

    Args:
        sources: the adapter folders, each with its weight (negative subtracts) and an optional name.
        combination_type: one of COMBINATION_TYPES: "stack" (exact sum of the weighted deltas) or a
            type of PEFT's add_weighted_adapter, reproduced with PEFT's rules and results.
        out_dir: the folder to write; it must not be one of the sources.
        svd_rank, svd_clamp, density, majority_sign_method: as in PEFT's add_weighted_adapter.
        seed: dare_* only; the CPU generator is seeded with it inside a forked RNG state (the
            caller's is untouched). None: use (and advance) the current generator.
        weights: optional, one per source; overrides AdapterSource.weight.
        base_model_dir: optional local base model folder (config.json), only to order the modules as
            model.named_modules() does for the random dare_* types.

    Returns:
        ``out_dir``, holding adapter_model.safetensors, adapter_config.json and merge_recipe.json.
    """
    ctype = lookup(combination_type)
    srcs = load_sources(sources, weights)
    out_dir = Path(out_dir)
    if any(same_path(s.path, out_dir) for s in srcs):
        raise CombinationArgumentError(
            f"The output folder {out_dir} is one of the adapters being combined; choose another output folder."
        )
    if ctype.is_peft:
        options = CombinationOptions(svd_rank, svd_clamp, density, seed=seed, base_model_dir=base_model_dir)
        combined = peft_combination(srcs, ctype, options=options, majority_sign_method=majority_sign_method)
    else:
        combined = stack(srcs)
    for note in combined.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    write(out_dir, combined, recipe(srcs, ctype.name, combined))
    return out_dir


__all__ = [
    "COMBINATION_TYPES",
    "RECIPE_FILE",
    "AdapterSource",
    "CombinationArgumentError",
    "CombinationType",
    "DifferentBaseModelsError",
    "IncompatibleAdaptersError",
    "UnknownCombinationTypeError",
    "UnsupportedCombinationError",
    "combine_adapters",
    "read_recipe",
]
