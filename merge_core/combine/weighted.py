"""Every PEFT type: PEFT 0.21.2's LoraModel.add_weighted_adapter, rule for rule.

Same validity rules, same new r / lora_alpha / target_modules, same per-module arithmetic
(peft_ops), same SVD call and clamp, and for the random dare_* types the same use of torch's
CPU generator (replay), so torch.manual_seed(seed) + PEFT on CPU gives the adapter seed=seed gives here.
"""

from __future__ import annotations

import math
from typing import Any

from ..factors import peft_delta_transposed
from .errors import CombinationArgumentError, IncompatibleAdaptersError
from .peft_ops import ModuleResult, Term, combine_module
from .replay import HEURISTIC, NOT_NEEDED, heuristic_key, order_modules, replay_injection, seeded
from .sources import Source, collect_replacements
from .types import SINGLE_ADAPTER, CombinationOptions, CombinationType, Layout
from .validate import (
    ModuleShape,
    check_common,
    check_options,
    check_peft_preconditions,
    check_svd_rank,
    peft_init,
    restrictions,
)
from .writer import CombinedAdapter, factor_keys, lora_config, padded

PEFT_SEMANTICS_VERSION = "0.21.2"
SEMANTICS = f"peft {PEFT_SEMANTICS_VERSION} LoraModel.add_weighted_adapter"


def peft_combination(
    sources: list[Source],
    asked: CombinationType,
    *,
    options: CombinationOptions,
    majority_sign_method: object,
) -> CombinedAdapter:
    """The adapter PEFT's add_weighted_adapter would add for ``asked``, its notes and its recipe parameters."""
    for s in sources:
        s.tensors.check_finite()
    shapes = check_common(sources)
    check_peft_preconditions(sources, asked)
    # PEFT: "if there is only one adapter, we can only use linear merging".
    ctype = SINGLE_ADAPTER if len(sources) == 1 else asked
    rank = _new_rank(sources, ctype, options.svd_rank)
    target_modules = _target_modules(sources)
    options = check_options(ctype, options, majority_sign_method)
    # modules_to_save: PEFT gives the new adapter fresh copies of the *original* modules.
    tensors, dropped = collect_replacements(sources, keep_modules_to_save=False)
    notes = _notes(sources, rank, dropped)
    if ctype.uses_svd_rank:
        _check_svd_fits(shapes, rank)
    modules, order = sorted(shapes, key=heuristic_key), NOT_NEEDED
    if ctype.is_random:
        modules, order = order_modules(modules, sources, options.base_model_dir)
        if order == HEURISTIC:
            notes.append(
                f"{ctype.name} is random: the module order for PEFT-identical random masks came from a name "
                "heuristic; pass base_model_dir (a folder with the base's config.json) to use the real order."
            )
    with seeded(options.seed if ctype.is_random else None):
        if ctype.is_random:
            init = peft_init(sources)
            for m in modules:
                replay_injection(init, rank, shapes[m])
        reduced = _combine_modules(sources, ctype, modules, shapes, rank=rank, options=options, tensors=tensors)
    if reduced:
        notes.append(
            f"Reduced SVD (full_matrices=False) instead of PEFT's full SVD for {len(reduced)} large module(s) "
            f"({', '.join(reduced[:3])}{', ...' if len(reduced) > 3 else ''}) to bound memory; the result equals "
            "PEFT's up to float rounding (~1e-7)."
        )
    first = sources[0]
    config = lora_config(
        sources, r=rank, use_rslora=first.config.use_rslora, target_modules=target_modules, modules_to_save=None
    )
    config.update(zip(("layers_to_transform", "layers_pattern", "exclude_modules"), restrictions(first), strict=True))
    return CombinedAdapter(tensors, config, SEMANTICS, notes, ctype.name, _parameters(ctype, options), order)


def _new_rank(sources: list[Source], ctype: CombinationType, svd_rank: int | None) -> int:
    ranks = [s.max_rank for s in sources]
    if ctype.needs_equal_ranks:
        if len(set(ranks)) != 1:
            raise IncompatibleAdaptersError(
                f"Combination type {ctype.name!r} needs adapters of equal rank (like PEFT's linear, ties, dare_ties, "
                "dare_linear and magnitude_prune), but the ranks are "
                + ", ".join(f"{s.name}: {r}" for s, r in zip(sources, ranks, strict=True))
                + ". Use 'stack' or 'cat' (exact, any ranks) or an *_svd type (any ranks, truncated to svd_rank)."
            )
        return ranks[0]
    if ctype.layout is Layout.CONCAT:
        return sum(ranks)
    return check_svd_rank(svd_rank) or max(ranks)


def _target_modules(sources: list[Source]) -> Any:
    """PEFT's new target_modules: the union of the lists, or the alternation of the regexes."""
    kinds = {
        set if isinstance(s.config.target_modules, (list, tuple, set)) else type(s.config.target_modules)
        for s in sources
    }
    if len(kinds) > 1:
        raise IncompatibleAdaptersError(
            "The adapters' target_modules are of different kinds (some a list of names, some a regex string: "
            + ", ".join(f"{s.name}: {s.config.target_modules!r}" for s in sources)
            + "). PEFT's add_weighted_adapter cannot combine those; use combination type 'stack'."
        )
    kind = kinds.pop()
    if kind is str:
        return "|".join(f"({s.config.target_modules})" for s in sources)
    if kind is set:
        return sorted({str(t) for s in sources for t in s.config.target_modules})  # type: ignore[union-attr]
    raise IncompatibleAdaptersError(
        f"Adapter {sources[0].name!r} has target_modules={sources[0].config.target_modules!r}; PEFT needs a list or "
        "a regex string to combine adapters. Use combination type 'stack'."
    )


def _notes(sources: list[Source], rank: int, dropped: list[str]) -> list[str]:
    notes = []
    if dropped:
        notes.append(
            "PEFT's add_weighted_adapter does not carry modules_to_save over (the combined adapter uses the base "
            f"weights there); left out: {', '.join(dropped)}. Use combination type 'stack' to keep them."
        )
    if sources[0].config.use_rslora:
        notes.append(
            f"As in PEFT, the combined adapter keeps use_rslora from the first adapter {sources[0].name!r}: with "
            f"r = lora_alpha = {rank} its scale is sqrt({rank}) = {math.sqrt(rank):.4g}, not 1."
        )
    return notes


def _check_svd_fits(shapes: dict[str, ModuleShape], rank: int) -> None:
    for m, shape in shapes.items():
        limit = min(shape.in_features, shape.out_features)
        if rank > limit:
            raise CombinationArgumentError(
                f"svd rank {rank} is larger than {m}'s smaller dimension {limit} (PEFT would fail there); "
                f"pass svd_rank <= {limit}."
            )


def _combine_modules(
    sources: list[Source],
    ctype: CombinationType,
    modules: list[str],
    shapes: dict[str, ModuleShape],
    *,
    rank: int,
    options: CombinationOptions,
    tensors: dict[str, Any],
) -> list[str]:
    """Every module's new factors into ``tensors``, in PEFT's order; returns the modules given a reduced SVD."""
    reduced = []
    fan_in_fan_out = sources[0].config.fan_in_fan_out
    for m in modules:
        shape = shapes[m]
        terms = [Term(*s.factors(m), s.scale(m), s.weight) for s in sources if m in s.tensors.lora_modules]
        if ctype.needs_equal_ranks and len({(t.a.shape, t.b.shape) for t in terms}) > 1:
            raise IncompatibleAdaptersError(
                f"{m}: the adapters give this module different ranks (rank_pattern), which {ctype.name!r} cannot "
                "add up (PEFT fails here too). Use 'stack', 'cat' or an *_svd type."
            )
        transposed = peft_delta_transposed(is_embedding=shape.is_embedding, fan_in_fan_out=fan_in_fan_out)
        result: ModuleResult = combine_module(ctype, terms, rank=rank, transposed=transposed, options=options)
        if result.a.shape[0] > rank:
            raise IncompatibleAdaptersError(f"{m}: combined rank {result.a.shape[0]} exceeds the adapter rank {rank}.")
        if result.reduced_svd:
            reduced.append(m)
        key_a, key_b = factor_keys(m, shape.is_embedding)
        tensors[key_a], tensors[key_b] = padded(result.a, result.b, rank)
    return reduced


def _parameters(ctype: CombinationType, options: CombinationOptions) -> dict[str, Any]:
    """The parameters this type used, as the recipe records them."""
    params: dict[str, Any] = {}
    if ctype.uses_svd_rank:
        params.update(svd_full_matrices=True, svd_rank=options.svd_rank, svd_clamp=options.svd_clamp)
    if ctype.needs_density:
        params["density"] = options.density
    if ctype.elects_signs:
        params["majority_sign_method"] = options.majority_sign.value
    if ctype.is_random:
        params["seed"] = options.seed
    return params
