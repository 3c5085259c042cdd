"""What every PEFT type's planner shares: adapter key parsing, config patterns, shape checks, errors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterConfigError, AdapterWeightsError, ShapeMismatchError, UnsupportedAdapterError

PEFT_PREFIX = "base_model.model."
_PARAM_SUFFIXES = ("weight", "bias")

Shape = tuple[int, ...]
ModuleKeys = dict[str, str]  # role ("hada_w1_a", "lora_A@1", "lora_B.bias") -> adapter key


@dataclass(frozen=True)
class ModuleInput:
    """What the planner knows about one adapted module when asking for its specs.

    ``name`` is the module's name as the adapter spells it (without ``base_model.model.``), not the base
    checkpoint's: PEFT matches rank_pattern, alpha_pattern and the other per-module config keys against it.

    ``base_shape`` is the shape of the module's stored weight; ``stored_transposed`` says it is stored
    (in, out) as transformers' Conv1D does; ``has_bias`` that the module stores a bias (IA3 scales it,
    lora_bias adds to it). For LoRA's target_parameters, ``params`` lists the module's own parameters
    (name -> stored shape) in the order the module registers them, which is the order PEFT wrapped
    them in; ``base_shape`` is then unused and ``stored_transposed`` means the module is ``is_transposed``
    (fused experts stored (experts, in, out), as gpt-oss does).
    """

    name: str
    keys: ModuleKeys
    base_shape: Shape
    stored_transposed: bool = False
    has_bias: bool = False
    params: Mapping[str, Shape] = field(default_factory=dict)  # target_parameters: parameter name -> stored shape


@dataclass(frozen=True)
class AdapterContext:
    """Adapter-wide facts a module's specs can depend on (VeRA's shared projections)."""

    config: Mapping[str, Any]
    shapes: Mapping[str, Shape]  # adapter key -> shape
    shared: Mapping[str, str] = field(default_factory=dict)  # "vera_A"/"vera_B" -> adapter key
    largest: tuple[int, int] | None = None  # VeRA: (largest out_features, largest in_features) over targets


def split_key(key: str, tokens: Iterable[str]) -> tuple[str, str] | None:
    """(module, role) for an adapter key whose path holds one of ``tokens``, else None.

    Accepts PEFT's layouts: with or without ``base_model.model.``, with or without an adapter-name infix
    after the token (``.default``), with a ``.weight``/``.bias`` tail; LoRA's target_parameters nest
    wrappers as ``.base_layer`` and their depth is kept in the role (``lora_A@1``).
    """
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    parts = key.split(".")
    token_set = set(tokens)
    for i, token in enumerate(parts):
        if token not in token_set or i == 0:
            continue
        rest = parts[i + 1 :]
        suffix = rest[-1] if rest and rest[-1] in _PARAM_SUFFIXES else None
        if suffix is not None:
            rest = rest[:-1]
        if len(rest) > 1:
            return None
        module = parts[:i]
        depth = 0
        while module and module[-1] == "base_layer":
            module, depth = module[:-1], depth + 1
        role = token + (f"@{depth}" if depth else "") + (".bias" if suffix == "bias" else "")
        return ".".join(module), role
    return None


def parse_keys(keys: Iterable[str], tokens: Iterable[str]) -> dict[str, ModuleKeys]:
    """Group adapter keys by module: {module: {role: key}}; keys naming no token are left out."""
    tokens = tuple(tokens)
    modules: dict[str, ModuleKeys] = {}
    for key in keys:
        found = split_key(key, tokens)
        if found is None:
            continue
        module, role = found
        entry = modules.setdefault(module, {})
        if role in entry:
            raise AdapterWeightsError(
                f"{module}: the adapter holds two tensors for {role} ({entry[role]} and {key}); "
                "keep one adapter per file."
            )
        entry[role] = key
    return modules


def pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(pattern.keys()), module)
    return pattern.get(key, default)


def number(config: Mapping[str, Any], name: str, default: Any, *, kind: type = float) -> Any:
    value = config.get(name, default)
    if value is None:
        value = default
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise AdapterConfigError(f"adapter_config.json: {name} must be a number, got {value!r}.") from exc


def require(module: str, keys: ModuleKeys, *roles: str) -> list[str]:
    missing = [r for r in roles if r not in keys]
    if missing:
        raise AdapterWeightsError(
            f"{module}: the adapter lacks {', '.join(missing)}; the adapter file is incomplete, "
            "save it again with PEFT."
        )
    return [keys[r] for r in roles]


def configured_rank(config: Mapping[str, Any], module: str) -> int:
    """The rank PEFT gives ``module``: its rank_pattern entry, else r."""
    return int(pattern_value(config.get("rank_pattern"), module, number(config, "r", 8, kind=int)))


def configured_alpha(config: Mapping[str, Any], module: str, *, alpha_key: str) -> float:
    """The alpha PEFT gives ``module``: its alpha_pattern entry, else the config's ``alpha_key`` (alpha, lora_alpha)."""
    return float(pattern_value(config.get("alpha_pattern"), module, number(config, alpha_key, 8.0)))


def check_rank(module: str, saved: int, configured: int) -> None:
    """The rank in the weights must be the one the config gives the module (r, rank_pattern)."""
    if saved != configured:
        raise AdapterConfigError(
            f"{module}: adapter_config.json gives this module rank {configured} but the weights have rank {saved}; "
            "the config does not belong to these weights, save the adapter again with PEFT."
        )


def mismatch(module: str, what: str) -> ShapeMismatchError:
    return ShapeMismatchError(f"{module}: {what}; the adapter was trained for another base model or layout.")


def lora_bias_missing(module: str) -> AdapterWeightsError:
    """lora_bias on but no lora_B.bias saved: PEFT always saves it, and loading without it keeps lora_B's initial
    bias (random unless init_lora_weights is true), so no merge can stand for what PEFT would compute."""
    return AdapterWeightsError(
        f"{module}: adapter_config.json sets lora_bias but the weights have no lora_B bias for this module; the "
        "config does not belong to these weights, so save the adapter again with PEFT."
    )


def refuse(peft_type: str, module: str, reason: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"{module}: this {peft_type} adapter {reason}, so it cannot be merged exactly.")


def require_matrix(peft_type: str, module: ModuleInput) -> tuple[int, int]:
    """(rows, cols) of a 2-D stored weight, or a refusal for convolutions and other shapes."""
    if len(module.base_shape) != 2:
        raise refuse(
            peft_type,
            module.name,
            f"targets a {len(module.base_shape)}-D weight {list(module.base_shape)} "
            "(a convolution); this tool merges it on Linear-like layers only",
        )
    return module.base_shape[0], module.base_shape[1]


def linear_features(peft_type: str, module: ModuleInput) -> tuple[int, int]:
    """(out_features, in_features) of a Linear-like module from its stored shape and orientation."""
    rows, cols = require_matrix(peft_type, module)
    return (cols, rows) if module.stored_transposed else (rows, cols)


def linear_only(peft_type: str, module: ModuleInput) -> tuple[int, int]:
    """(out_features, in_features) of an (out, in) weight; types PEFT wraps on nn.Linear only refuse a Conv1D one."""
    if module.stored_transposed:
        raise refuse(
            peft_type,
            module.name,
            f"targets a weight stored (in, out) like transformers' Conv1D, which PEFT does not wrap with {peft_type}",
        )
    return linear_features(peft_type, module)


def peft_config(peft_type: str, raw: Mapping[str, Any]) -> Any:
    """The adapter's config as PEFT's own config class reads it (its defaults for keys an older file lacks)."""
    import dataclasses
    import warnings

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {k: v for k, v in raw.items() if k in names}
    try:
        with warnings.catch_warnings():  # PEFT's config warnings address people training, not merging
            warnings.simplefilter("ignore")
            return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise AdapterConfigError(f"adapter_config.json is not a valid {peft_type} config for PEFT: {exc}") from exc
