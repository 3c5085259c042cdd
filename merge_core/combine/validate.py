"""Checks across the adapters being combined, and of the combination's parameters against its type."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..factors import checked_factors
from ..mismatch import same_model_name
from .errors import (
    CombinationArgumentError,
    DifferentBaseModelsError,
    IncompatibleAdaptersError,
    UnsupportedCombinationError,
)
from .sources import Source, names_overlap
from .types import CombinationOptions, CombinationType, MajoritySign

# LoRA variants whose forward or initialisation is not "W + scale * b @ a".
_VARIANT_KEYS = {
    "kasa_config": "KaSA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
# Initialisations PEFT can re-run for the new adapter without reading or rewriting the base weights.
_PLAIN_INITS = (True, False, "gaussian", "eva")
_RESTRICTION_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass(frozen=True)
class ModuleShape:
    """The layer a LoRA module sits on, which every adapter touching it must agree on."""

    in_features: int
    out_features: int
    is_embedding: bool

    def __str__(self) -> str:
        return f"{self.in_features} -> {self.out_features}{' (embedding)' if self.is_embedding else ''}"


def check_common(sources: list[Source]) -> dict[str, ModuleShape]:
    """The checks every combination type needs; returns the shape of every LoRA module."""
    for s in sources:
        _check_plain_lora(s)
    fifo = {s.config.fan_in_fan_out for s in sources}
    if len(fifo) > 1:
        raise IncompatibleAdaptersError(
            "The adapters disagree on fan_in_fan_out ("
            + ", ".join(f"{s.name}: {s.config.fan_in_fan_out}" for s in sources)
            + "), so they were made for differently laid out models. Combine only adapters of the same base model."
        )
    _check_declared_bases(sources)
    return _module_shapes(sources)


def _check_plain_lora(s: Source) -> None:
    if s.config.use_dora or any(m.magnitude for m in s.tensors.lora_modules.values()):
        raise UnsupportedCombinationError(
            f"Adapter {s.name!r} is a DoRA adapter (use_dora / lora_magnitude_vector). DoRA rescales the whole "
            "weight by a learned magnitude, so DoRA adapters cannot be summed or mixed into one LoRA. Merge it "
            "on its own, or leave it out of the combination."
        )
    if s.config.ensure_weight_tying:
        raise UnsupportedCombinationError(
            f"Adapter {s.name!r} uses ensure_weight_tying (LoRA shared between embedding and lm_head), which "
            "cannot be combined with other adapters yet. Merge it on its own."
        )
    for key, what in _VARIANT_KEYS.items():
        if s.config.raw.get(key) not in (None, False, {}, [], ""):
            raise UnsupportedCombinationError(
                f"Adapter {s.name!r} uses the LoRA variant {what} ({key}); it cannot be combined exactly. "
                "Merge it on its own."
            )


def _check_declared_bases(sources: list[Source]) -> None:
    named = [s for s in sources if s.config.base_model_name_or_path]
    for s in named[1:]:
        first, other = named[0].config.base_model_name_or_path, s.config.base_model_name_or_path
        if not same_model_name(first, other):
            raise DifferentBaseModelsError(
                f"Adapter {named[0].name!r} was trained on {first!r} but adapter {s.name!r} on {other!r}. Adapters "
                "can only be combined when they share the base model; pick adapters of one base (if they really "
                "share it, correct base_model_name_or_path in adapter_config.json)."
            )


def _module_shapes(sources: list[Source]) -> dict[str, ModuleShape]:
    shapes: dict[str, ModuleShape] = {}
    owner: dict[str, str] = {}
    for s in sources:
        for name, module in s.tensors.lora_modules.items():
            f = checked_factors(s.config, s.tensors, module, adapter_name=s.name)
            if f.kernel:
                raise UnsupportedCombinationError(
                    f"Adapter {s.name!r} has LoRA on the convolution {name}, which combining does not handle yet; "
                    "merge that adapter on its own."
                )
            shape = ModuleShape(f.in_features, f.out_features, f.is_embedding)
            if name in shapes and shapes[name] != shape:
                raise DifferentBaseModelsError(
                    f"{name}: adapter {owner[name]!r} maps {shapes[name]} features but adapter {s.name!r} maps "
                    f"{shape}. The adapters were trained for different base models; combine only adapters of the "
                    "same base."
                )
            shapes.setdefault(name, shape)
            owner.setdefault(name, s.name)
    if not shapes:
        raise UnsupportedCombinationError("The adapters have no LoRA modules; there is nothing to combine.")
    return shapes


def check_modules_to_save_conflicts(sources: list[Source], what: str) -> None:
    """Two trained full copies of one module cannot live in one adapter (PEFT refuses it too)."""
    for i, s in enumerate(sources):
        for t in sources[i + 1 :]:
            both = sorted({a for a in s.modules_to_save for b in t.modules_to_save if names_overlap(a, b)})
            if both:
                raise IncompatibleAdaptersError(
                    f"Adapters {s.name!r} and {t.name!r} both replace {', '.join(both)} with a trained full copy "
                    f"(modules_to_save); {what} cannot keep two different copies of one module. Leave one of the "
                    "two adapters out (or give it weight 0 with stack)."
                )


def restrictions(s: Source) -> tuple[Any, ...]:
    """layers_to_transform, layers_pattern and exclude_modules, with every empty spelling as None."""
    return tuple(None if s.config.raw.get(k) in (None, [], "", {}) else s.config.raw.get(k) for k in _RESTRICTION_KEYS)


def peft_init(sources: list[Source]) -> Any:
    """The first adapter's init_lora_weights, which PEFT re-runs for the new adapter; refused if not a plain LoRA."""
    first = sources[0]
    init = first.config.raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() == "gaussian":
        init = "gaussian"
    if init not in _PLAIN_INITS:
        raise UnsupportedCombinationError(
            f"The first adapter {first.name!r} has init_lora_weights={init!r}. PEFT's add_weighted_adapter re-runs the "
            "first adapter's initialisation for the new adapter, and this one reads or rewrites the base weights, "
            "so the combination is not a plain LoRA. Put another adapter first, or use combination type 'stack'."
        )
    return init


def check_peft_preconditions(sources: list[Source], ctype: CombinationType) -> None:
    """What PEFT's add_weighted_adapter needs of the adapters beyond check_common."""
    for s in sources:
        if s.config.lora_bias:
            raise UnsupportedCombinationError(
                f"Adapter {s.name!r} trains LoRA biases (lora_bias); PEFT's add_weighted_adapter ignores them and "
                f"leaves the new adapter's bias at its random initial value, so {ctype.name!r} has no exact result. "
                "Use combination type 'stack', which sums the biases."
            )
    biased = [s.name for s in sources if str(s.config.raw.get("bias", "none")) != "none"]
    if len(biased) > 1 or (biased and sources[0].config.raw.get("bias", "none") != "none"):
        raise IncompatibleAdaptersError(
            f"Adapters {', '.join(biased)} train the base biases (bias != 'none'); PEFT supports only one such "
            "adapter, and not as the first one. Put it later in the list, or use combination type 'stack'."
        )
    peft_init(sources)
    # Compared as tuples, not in a set: layers_to_transform may be a list.
    if any(restrictions(s) != restrictions(sources[0]) for s in sources[1:]):
        raise IncompatibleAdaptersError(
            "The adapters use different layers_to_transform / layers_pattern / exclude_modules. PEFT's "
            "add_weighted_adapter would apply the first adapter's to all of them (dropping or failing on the others' "
            "layers). Use combination type 'stack', which keeps every adapter's own layers."
        )
    check_modules_to_save_conflicts(sources, f"PEFT's add_weighted_adapter ({ctype.name})")


def check_svd_rank(svd_rank: object) -> int | None:
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 0):
        raise CombinationArgumentError(
            f"svd_rank must be a positive integer (or None for the largest rank), got {svd_rank!r}."
        )
    return svd_rank


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_options(
    ctype: CombinationType, options: CombinationOptions, majority_sign_method: object
) -> CombinationOptions:
    """``options`` with majority_sign_method read as MajoritySign, once each parameter this type uses is valid."""
    if ctype.needs_density:
        density = options.density
        if not _is_number(density):
            raise CombinationArgumentError(
                f"Combination type {ctype.name!r} needs density, the fraction of values kept (0..1), e.g. density=0.5."
            )
        if not 0 <= density <= 1:  # type: ignore[operator]
            raise CombinationArgumentError(f"density must be between 0 and 1 (fraction of values kept), got {density}.")
    sign = MajoritySign.TOTAL
    if ctype.elects_signs:
        if majority_sign_method not in tuple(MajoritySign):
            raise CombinationArgumentError(
                f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}."
            )
        sign = MajoritySign(majority_sign_method)
    clamp = options.svd_clamp
    if ctype.uses_svd_rank and clamp is not None and not (_is_number(clamp) and 0 <= clamp <= 1):
        raise CombinationArgumentError(f"svd_clamp is a quantile between 0 and 1 (e.g. 0.99), got {clamp!r}.")
    return replace(options, majority_sign=sign)
