"""Combine several PEFT LoRA adapters into ONE standard PEFT LoRA adapter folder.

The merge engine merges one adapter folder into a base model. To merge several adapters we
first turn them into one adapter whose merge is exactly the wanted combination; planning,
merging, verification and the PeftModel comparison then work unchanged on that folder.

Two families of combination types:

* ``"stack"``: the sum of every adapter's own delta, each scaled by its weight,
  ``W' = W + sum_i weight_i * scale_i * B_i @ A_i`` -- what PEFT computes when the adapters
  are loaded side by side and all merged (``merge_and_unload(adapter_names=[...])``). It is
  written as a concatenated LoRA (A = cat_i(A_i * weight_i * scale_i), B = cat_i(B_i), scale 1),
  so it is exact for any ranks and any target modules.
* every other type: PEFT 0.21.2's ``LoraModel.add_weighted_adapter`` (same validity rules, same
  new r / lora_alpha / target_modules, same per-module arithmetic, same SVD call and clamp,
  and for the random ``dare_*`` types the same consumption of torch's global CPU generator, so
  ``torch.manual_seed(seed)`` + PEFT on CPU gives the same adapter as ``seed=seed`` here).

RNG parity of the ``dare_*`` types needs two things PEFT does implicitly:

1. ``add_weighted_adapter`` first *injects* the new adapter, which draws random numbers for
   every new LoRA layer (``nn.Linear`` constructors, then ``init_lora_weights`` of the first
   adapter: kaiming-uniform for ``True``, normal for ``"gaussian"``; ``torch.randn`` for
   embeddings). We replay exactly those draws with tensors of the same shapes.
2. it then walks the LoRA layers in ``model.named_modules()`` order. Adapter files are stored
   sorted by name ("layers.10" before "layers.2", "mlp" before "self_attn"), so we rebuild the
   real order from the base model's config.json (model built on the meta device, no weights
   read; ``base_model_dir`` or the adapters' local ``base_model_name_or_path``). Without a
   local config we fall back to a name heuristic covering common architectures and say so in
   the recipe (``module_order``); parity then holds only when the heuristic order is right.

Parity is defined for PEFT running on CPU in float32 (what PEFT does with float32 adapters on a
CPU model). On a GPU, PEFT's dare masks come from the CUDA generator, so no CPU code can
reproduce them bit for bit; the math is the same, the random masks are not.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from .adapter import (
    ADAPTER_CONFIG,
    ADAPTER_SAFETENSORS,
    AdapterConfig,
    AdapterWeights,
    LoraModule,
    load_adapter_config,
    load_adapter_weights,
)
from .errors import AdapterBaseMismatchError, MergeError, UnsupportedAdapterError

# All eleven types of PEFT 0.21.2's add_weighted_adapter exist there, plus our "stack".
COMBINATION_TYPES = (
    "stack",
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
PEFT_COMBINATION_TYPES = tuple(t for t in COMBINATION_TYPES if t != "stack")
EQUAL_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
DENSITY_TYPES = (
    "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
    "magnitude_prune_svd",
)
SIGN_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
RANDOM_TYPES = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
PEFT_SEMANTICS_VERSION = "0.21.2"

# Above this many elements in one full SVD factor, we compute the reduced SVD instead of
# PEFT's full_matrices=True (same leading singular vectors up to float rounding; PEFT would
# need e.g. vocab x vocab floats for an embedding and run out of memory).
_FULL_SVD_LIMIT = 1 << 29

_PREFIX = "base_model.model."
_INIT_OK = (True, False, "gaussian", "eva")
# LoRA variants whose forward or initialisation is not "W + scale * B @ A".
_VARIANT_KEYS = {
    "kasa_config": "KaSA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}


# --- errors -------------------------------------------------------------------------------------


class CombinationArgumentError(MergeError, ValueError):
    """The combination request itself is invalid (no adapters, bad weights or parameters)."""


class UnknownCombinationTypeError(CombinationArgumentError):
    """The combination type is not one we support."""


class IncompatibleAdaptersError(UnsupportedAdapterError):
    """These adapters cannot be combined with this combination type (ranks, targets, ...)."""


class UnsupportedCombinationError(UnsupportedAdapterError):
    """An adapter uses a feature that cannot be combined exactly (DoRA, lora_bias, ...)."""


class DifferentBaseModelsError(AdapterBaseMismatchError):
    """The adapters were trained for different base models."""


# --- API -----------------------------------------------------------------------------------------


@dataclass
class AdapterSource:
    path: Path
    weight: float = 1.0
    name: str | None = None


@dataclass
class _Source:
    index: int
    name: str
    path: Path
    weight: float
    cfg: AdapterConfig
    weights: AdapterWeights

    @property
    def max_rank(self) -> int:
        # PEFT: "the maximum possible rank", r or the largest rank_pattern value.
        cfg = self.cfg
        return cfg.r if not cfg.rank_pattern else max(cfg.r, *(int(v) for v in cfg.rank_pattern.values()))


@dataclass(frozen=True)
class _ModuleShape:
    in_features: int
    out_features: int
    is_embedding: bool


def combine_adapters(
    sources: list[AdapterSource],
    combination_type: str,
    out_dir: Path,
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = 0,
    weights: Optional[Sequence[float]] = None,
    base_model_dir: Optional[Path] = None,
) -> Path:
    """Write ONE PEFT LoRA adapter folder (out_dir) that merges to the combination of `sources`.

    weights: optional, one per source; overrides AdapterSource.weight.
    base_model_dir: optional local base model folder (config.json); only used to order the
    modules like ``model.named_modules()`` for the random dare_* types (PEFT RNG parity).
    seed: dare_* only; the global CPU RNG is seeded with it inside a forked RNG state (the
    caller's RNG is left untouched). None: use (and advance) the current global RNG.
    """
    ctype = _check_type(combination_type)
    srcs = _load_sources(sources, weights)
    out_dir = Path(out_dir)
    for s in srcs:
        if _same_path(s.path, out_dir):
            raise CombinationArgumentError(
                f"The output folder {out_dir} is one of the adapters being combined; choose another output folder."
            )
    if ctype == "stack":
        # Weight 0 leaves an adapter out entirely (its LoRA and its modules_to_save), so it
        # is not checked either: "pick one of three" works whatever the other two are.
        active = [s for s in srcs if s.weight != 0.0]
        if not active:
            raise CombinationArgumentError("Every adapter has weight 0, so the combination would change nothing; "
                                           "give at least one adapter a non-zero weight.")
        for s in active:
            s.weights.check_finite()
        tensors, config, notes = _stack(srcs, active, _check_common(active))
        params: dict[str, Any] = {}
        effective = ctype
        order_info = "not needed (deterministic)"
    else:
        for s in srcs:
            s.weights.check_finite()
        shapes = _check_common(srcs)
        tensors, config, notes, effective, params, order_info = _peft_combination(
            srcs, ctype, shapes, svd_rank=svd_rank, svd_clamp=svd_clamp, density=density,
            majority_sign_method=majority_sign_method, seed=seed, base_model_dir=base_model_dir,
        )
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    config["lora_merge_space"] = {
        "combination_type": ctype,
        **({"effective_combination_type": effective} if effective != ctype else {}),
        "sources": [
            {"name": s.name, "path": str(s.path), "weight": s.weight, "r": s.cfg.r, "lora_alpha": s.cfg.lora_alpha,
             "use_rslora": s.cfg.use_rslora, "base_model_name_or_path": s.cfg.base_model_name_or_path}
            for s in srcs
        ],
        "weights": [s.weight for s in srcs],
        "parameters": params,
        "semantics": ("sum of the adapters' deltas, each times its weight" if ctype == "stack"
                      else f"peft {PEFT_SEMANTICS_VERSION} LoraModel.add_weighted_adapter"),
        "module_order": order_info,
        "notes": notes,
    }
    _write(out_dir, tensors, config)
    return out_dir


def requirements_text() -> str:
    """What each combination type needs of the adapters (for the README and the app's help)."""
    return """\
Combining several LoRA adapters into one

All types: the adapters must be LoRA adapters of the same base model (same module shapes;
base_model_name_or_path must agree when both adapters name one) with the same fan_in_fan_out.
Not combinable: DoRA (use_dora), LoRA on convolutions, ensure_weight_tying, KaSA/Arrow/other
LoRA variants. Each adapter has a weight; negative weights subtract.

Different ranks AND different target modules allowed:
  stack   exact sum of every adapter's own change, each times its weight (what PEFT gives when
          it merges the loaded adapters one after the other). New rank = the sum of the ranks
          that meet on a module. Carries modules_to_save and lora_bias over (refused if two
          adapters replace the same module with modules_to_save). Weight 0 leaves an adapter out.
  cat     PEFT's "cat": the same concatenation as stack, new rank = sum of all ranks. Exact
          sum, except that (as in PEFT) the new adapter keeps the first adapter's use_rslora.
  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
          combine the full changes (svd: weighted sum; the others first prune/elect signs),
          then truncate to svd_rank (default: the largest rank) with an SVD; svd_clamp clips
          outliers. svd_rank must not exceed any combined layer's smaller dimension.

EQUAL ranks required (different target modules allowed):
  linear, ties, dare_linear, dare_ties, magnitude_prune
          combine the A matrices and the B matrices separately (fast, but not the sum of the
          changes: cross terms appear). Rank = the common rank (r, or the largest rank_pattern).

Target modules: every PEFT type except stack needs all adapters' target_modules of one kind
(all lists, or all regex strings); the result targets their union. stack accepts any mix.
layers_to_transform / layers_pattern / exclude_modules must be equal for PEFT types (PEFT would
apply the first adapter's to all); stack accepts any.

Parameters: density (0..1) is required by ties*, dare_* and magnitude_prune*;
majority_sign_method ("total" or "frequency") is used by ties* and dare_ties*;
dare_* are random: the same seed gives the same result (and PEFT's result on CPU).

PEFT behaviour kept on purpose (add_weighted_adapter): the new adapter takes use_rslora from the
first adapter (its scale is then sqrt(rank) instead of 1), and modules_to_save are NOT carried
over (PEFT resets them to the base weights); use stack to keep them. With a single adapter
every PEFT type acts as linear."""


# --- validation ----------------------------------------------------------------------------------


def _check_type(combination_type: str) -> str:
    if combination_type not in COMBINATION_TYPES:
        raise UnknownCombinationTypeError(
            f"Unknown combination type {combination_type!r}. Choose one of: {', '.join(COMBINATION_TYPES)}."
        )
    return combination_type


def _load_sources(sources: Sequence[AdapterSource], weights: Optional[Sequence[float]]) -> list[_Source]:
    if sources is None or len(sources) == 0:
        raise CombinationArgumentError("No adapters to combine: pass at least one adapter folder.")
    items = [s if isinstance(s, AdapterSource) else AdapterSource(Path(s)) for s in sources]
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(items):
            raise CombinationArgumentError(
                f"Got {len(weights)} weight(s) for {len(items)} adapter(s); give exactly one weight per adapter."
            )
    out: list[_Source] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        w = item.weight if weights is None else weights[i]
        try:
            w = float(w)
        except (TypeError, ValueError) as exc:
            raise CombinationArgumentError(f"The weight of adapter {i + 1} is not a number: {w!r}.") from exc
        if not math.isfinite(w):
            raise CombinationArgumentError(f"The weight of adapter {i + 1} is {w}; weights must be finite numbers.")
        path = Path(item.path)
        name = item.name or path.name or f"adapter{i + 1}"
        if name in seen:
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        else:
            seen[name] = 1
        cfg = load_adapter_config(path)
        aw = load_adapter_weights(path)
        out.append(_Source(i, name, path, w, cfg, aw))
    return out


def _same_path(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _same_base(a: str, b: str) -> bool:
    x, y = a.rstrip("/\\"), b.rstrip("/\\")
    if x == y or _same_path(Path(x), Path(y)):
        return True
    # "meta-llama/Llama-2-7b-hf" and "/models/Llama-2-7b-hf" name the same model.
    return x.replace("\\", "/").rsplit("/", 1)[-1].lower() == y.replace("\\", "/").rsplit("/", 1)[-1].lower()


def _module_shape(s: _Source, mod: LoraModule) -> _ModuleShape:
    specs = s.weights.specs
    a, b = specs[mod.a].shape, specs[mod.b].shape  # type: ignore[index]
    if len(a) != 2 or len(b) != 2:
        raise UnsupportedCombinationError(
            f"Adapter {s.name!r}: {mod.module} is LoRA on a convolution ({len(a)}-D weights); only Linear, Conv1D "
            "and Embedding LoRA can be combined. Merge this adapter on its own instead."
        )
    if a[0] != b[1]:
        raise UnsupportedCombinationError(
            f"Adapter {s.name!r}: {mod.module} has lora_A of rank {a[0]} but lora_B of rank {b[1]}; the adapter file is "
            "inconsistent. Save it again with PEFT."
        )
    configured = s.cfg.rank_for(mod.module)
    if configured != a[0]:
        raise UnsupportedCombinationError(
            f"Adapter {s.name!r}: {mod.module} has rank {a[0]} in its weights but adapter_config.json says {configured}. "
            "The config does not belong to these weights; save the adapter again with PEFT."
        )
    return _ModuleShape(int(a[1]), int(b[0]), mod.is_embedding)


def _check_common(srcs: list[_Source]) -> dict[str, _ModuleShape]:
    """Checks every combination type needs; returns the shape of every LoRA module."""
    for s in srcs:
        cfg = s.cfg
        if cfg.use_dora or any(m.magnitude for m in s.weights.lora_modules.values()):
            raise UnsupportedCombinationError(
                f"Adapter {s.name!r} is a DoRA adapter (use_dora / lora_magnitude_vector). DoRA rescales the whole "
                "weight by a learned magnitude, so DoRA adapters cannot be summed or mixed into one LoRA. Merge it "
                "on its own, or leave it out of the combination."
            )
        if cfg.ensure_weight_tying:
            raise UnsupportedCombinationError(
                f"Adapter {s.name!r} uses ensure_weight_tying (LoRA shared between embedding and lm_head), which "
                "cannot be combined with other adapters yet. Merge it on its own."
            )
        for key, what in _VARIANT_KEYS.items():
            if cfg.raw.get(key) not in (None, False, {}, [], ""):
                raise UnsupportedCombinationError(
                    f"Adapter {s.name!r} uses the LoRA variant {what} ({key}); it cannot be combined exactly. "
                    "Merge it on its own."
                )
    fifo = {s.cfg.fan_in_fan_out for s in srcs}
    if len(fifo) > 1:
        raise IncompatibleAdaptersError(
            "The adapters disagree on fan_in_fan_out ("
            + ", ".join(f"{s.name}: {s.cfg.fan_in_fan_out}" for s in srcs)
            + "), so they were made for differently laid out models. Combine only adapters of the same base model."
        )
    named = [s for s in srcs if s.cfg.base_model_name_or_path]
    for s in named[1:]:
        if not _same_base(named[0].cfg.base_model_name_or_path, s.cfg.base_model_name_or_path):  # type: ignore[arg-type]
            raise DifferentBaseModelsError(
                f"Adapter {named[0].name!r} was trained on {named[0].cfg.base_model_name_or_path!r} but adapter "
                f"{s.name!r} on {s.cfg.base_model_name_or_path!r}. Adapters can only be combined when they share "
                "the base model; pick adapters of one base (if they really share it, correct "
                "base_model_name_or_path in adapter_config.json)."
            )
    shapes: dict[str, _ModuleShape] = {}
    owner: dict[str, str] = {}
    for s in srcs:
        for name, mod in s.weights.lora_modules.items():
            shape = _module_shape(s, mod)
            if name in shapes and shapes[name] != shape:
                old = shapes[name]
                raise DifferentBaseModelsError(
                    f"{name}: adapter {owner[name]!r} maps {old.in_features} -> {old.out_features} features"
                    f"{' (embedding)' if old.is_embedding else ''} but adapter {s.name!r} maps {shape.in_features} -> "
                    f"{shape.out_features}{' (embedding)' if shape.is_embedding else ''}. The adapters were trained "
                    "for different base models; combine only adapters of the same base."
                )
            shapes.setdefault(name, shape)
            owner.setdefault(name, s.name)
    if not shapes:
        raise UnsupportedCombinationError("The adapters have no LoRA modules; there is nothing to combine.")
    return shapes


def _mts_names(s: _Source) -> list[str]:
    return [str(n) for n in (s.cfg.modules_to_save or [])]


def _names_overlap(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _check_modules_to_save_conflicts(srcs: list[_Source], what: str) -> None:
    for i, s in enumerate(srcs):
        for t in srcs[i + 1:]:
            both = sorted({a for a in _mts_names(s) for b in _mts_names(t) if _names_overlap(a, b)})
            if both:
                raise IncompatibleAdaptersError(
                    f"Adapters {s.name!r} and {t.name!r} both replace {', '.join(both)} with a trained full copy "
                    f"(modules_to_save); {what} cannot keep two different copies of one module. Leave one of the "
                    "two adapters out (or give it weight 0 with stack)."
                )


def _is_modules_to_save(s: _Source, target: str) -> bool:
    module = target.rsplit(".", 1)[0]
    return any(_names_overlap(module, n) for n in _mts_names(s))


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape:
        return False
    if x.dtype == y.dtype:
        return torch.equal(x, y)
    common = torch.promote_types(x.dtype, y.dtype)
    return torch.equal(x.to(common), y.to(common))


def _collect_replacements(srcs: list[_Source], keep_modules_to_save: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full tensors the sources ship (modules_to_save, saved embedding layers, trained biases).

    Identical copies of one tensor (e.g. the unchanged base embedding PEFT saves next to an
    embedding LoRA) are kept once; two different values for one tensor are refused.
    """
    out: dict[str, torch.Tensor] = {}
    by_target: dict[str, tuple[str, str, torch.Tensor]] = {}
    dropped: list[str] = []
    for s in srcs:
        for target, key in s.weights.replacements.items():
            if _is_modules_to_save(s, target) and not keep_modules_to_save:
                dropped.append(f"{s.name}:{target}")
                continue
            # Kept in their stored dtype: a bf16 lm_head copy would only double in size as float32.
            value = s.weights.tensor(key)
            if target in by_target:
                other_name, _, other = by_target[target]
                if _same_tensor(other, value):
                    continue
                raise IncompatibleAdaptersError(
                    f"Adapters {other_name!r} and {s.name!r} both ship a full copy of {target} (modules_to_save, a "
                    "resized embedding or a trained bias) with different values; one combined adapter cannot hold "
                    "both. Leave one of them out of the combination."
                )
            by_target[target] = (s.name, key, value)
            out_key = key if key.startswith(_PREFIX) else _PREFIX + key
            out[out_key] = value.contiguous()
    return out, dropped


# --- module order (PEFT walks model.named_modules()) ---------------------------------------------

_ORDER_HINTS = {
    # the model body first, then the head; inside it embeddings, the blocks, the final norm
    "model": 2, "transformer": 2, "gpt_neox": 2, "language_model": 2, "backbone": 2, "base_model": 2,
    "embed_tokens": 0, "wte": 0, "word_embeddings": 0, "embed_in": 0, "wpe": 1, "embeddings": 0,
    "layers": 5, "h": 5, "blocks": 5, "layer": 5, "decoder": 5, "encoder": 4,
    "norm": 8, "ln_f": 8, "final_layernorm": 8, "final_layer_norm": 8,
    "lm_head": 20, "embed_out": 20, "score": 20, "classifier": 20,
    # inside a block: attention, then the MLP
    "self_attn": 10, "attn": 10, "attention": 10, "self_attention": 10, "mixer": 10,
    "cross_attn": 11, "encoder_attn": 11,
    "mlp": 12, "feed_forward": 12, "block_sparse_moe": 12, "ffn": 12,
    "q_proj": 30, "k_proj": 31, "v_proj": 32, "o_proj": 33, "qkv_proj": 30, "query_key_value": 30, "c_attn": 30,
    "query": 30, "key": 31, "value": 32, "dense": 34, "out_proj": 33,
    "gate_proj": 40, "up_proj": 41, "down_proj": 42, "gate_up_proj": 40, "c_fc": 30, "c_proj": 35,
    "fc1": 40, "fc2": 41, "w1": 40, "w2": 41, "w3": 42, "dense_h_to_4h": 40, "dense_4h_to_h": 41,
}


def _heuristic_key(name: str) -> tuple:
    key = []
    for part in name.split("."):
        if part.isdigit():
            key.append((0, int(part), ""))
        else:
            key.append((1, _ORDER_HINTS.get(part, 100), part))
    return tuple(key)


_TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _named_modules_of(base_dir: Path, task_type: Optional[str]) -> Optional[list[str]]:
    """named_modules() of the base model, built on the meta device from config.json (no weights)."""
    if not (base_dir / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
        classes = [_TASK_AUTO_CLASSES.get(task_type or "", "AutoModelForCausalLM"), "AutoModelForCausalLM", "AutoModel"]
        with torch.random.fork_rng(devices=[]):
            for cls_name in dict.fromkeys(classes):
                try:
                    with torch.device("meta"):
                        model = getattr(transformers, cls_name).from_config(config)
                except Exception:  # noqa: BLE001 - an unknown architecture: try the next class
                    continue
                return [n for n, _ in model.named_modules()]
    except Exception:  # noqa: BLE001 - remote code, broken config: fall back to the heuristic
        return None
    return None


def _order_modules(names: Iterable[str], srcs: list[_Source], base_model_dir: Optional[Path]) -> tuple[list[str], str]:
    names = list(names)
    candidates: list[Path] = []
    if base_model_dir is not None:
        candidates.append(Path(base_model_dir))
    for s in srcs:
        if s.cfg.base_model_name_or_path:
            p = Path(s.cfg.base_model_name_or_path)
            if p.is_dir() and all(not _same_path(p, c) for c in candidates):
                candidates.append(p)
    task = next((s.cfg.task_type for s in srcs if s.cfg.task_type), None)
    for base in candidates:
        order = _named_modules_of(base, task)
        if order is None:
            continue
        pos = {n: i for i, n in enumerate(order)}
        if all(n in pos for n in names):
            return sorted(names, key=pos.__getitem__), f"named_modules() of the base model config in {base}"
    return sorted(names, key=_heuristic_key), (
        "name heuristic (no local base config.json found; pass base_model_dir for exact PEFT module order)"
    )


# --- stack ---------------------------------------------------------------------------------------


def _lora_keys(module: str, is_embedding: bool) -> tuple[str, str]:
    if is_embedding:
        return f"{_PREFIX}{module}.lora_embedding_A", f"{_PREFIX}{module}.lora_embedding_B"
    return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


def _ab(s: _Source, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    mod = s.weights.lora_modules[module]
    a = s.weights.tensor(mod.a).to(torch.float32)  # type: ignore[arg-type]
    b = s.weights.tensor(mod.b).to(torch.float32)  # type: ignore[arg-type]
    return a.contiguous(), b.contiguous()


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A / columns of B up to `rank`: B @ A is unchanged."""
    r = a.shape[0]
    if r == rank:
        return a.contiguous(), b.contiguous()
    a_out = torch.zeros((rank, a.shape[1]), dtype=torch.float32)
    b_out = torch.zeros((b.shape[0], rank), dtype=torch.float32)
    a_out[:r] = a
    b_out[:, :r] = b
    return a_out, b_out


def _stack(srcs: list[_Source], active: list[_Source], shapes: dict[str, _ModuleShape]):
    notes: list[str] = []
    left_out = [s.name for s in srcs if s.weight == 0.0]
    if left_out:
        notes.append(f"Left out (weight 0), including their modules_to_save: {', '.join(left_out)}.")
    _check_modules_to_save_conflicts(active, "stack")
    tensors, _ = _collect_replacements(active, keep_modules_to_save=True)

    modules = sorted({m for s in active for m in s.weights.lora_modules}, key=_heuristic_key)
    ranks = {m: sum(s.weights.specs[s.weights.lora_modules[m].a].shape[0]  # type: ignore[index]
                    for s in active if m in s.weights.lora_modules) for m in modules}
    r_new = max(ranks.values())
    use_bias = False
    for m in modules:
        parts_a, parts_b, bias = [], [], None
        for s in active:
            if m not in s.weights.lora_modules:
                continue
            a, b = _ab(s, m)
            scale = s.cfg.scale_for(m)
            parts_a.append(a * s.weight * scale)  # the very expression of PEFT's "cat"
            parts_b.append(b)
            mod = s.weights.lora_modules[m]
            if mod.b_bias is not None:
                term = s.weights.tensor(mod.b_bias).to(torch.float32) * s.weight * scale
                bias = term if bias is None else bias + term
        a_new, b_new = _pad(torch.cat(parts_a, dim=0), torch.cat(parts_b, dim=1), r_new)
        key_a, key_b = _lora_keys(m, shapes[m].is_embedding)
        tensors[key_a], tensors[key_b] = a_new, b_new
        if bias is not None:
            use_bias = True
            tensors[f"{_PREFIX}{m}.lora_B.bias"] = bias.contiguous()

    plain_lists = all(isinstance(s.cfg.target_modules, (list, tuple)) for s in active) and not any(
        _restrictions(s) != (None, None, None) for s in active
    )
    if plain_lists:
        target_modules: Any = sorted({str(t) for s in active for t in s.cfg.target_modules})
    else:  # regexes or layer restrictions: name exactly the modules that carry weights
        target_modules = sorted(modules)
    mts: list[str] = []
    for s in active:
        for n in _mts_names(s):
            if n not in mts:
                mts.append(n)
    first = active[0]
    config = _base_config(active, r=r_new, alpha=r_new, use_rslora=False, target_modules=target_modules,
                          modules_to_save=mts or None, lora_bias=use_bias)
    config["task_type"] = next((s.cfg.task_type for s in active if s.cfg.task_type), first.cfg.task_type)
    return tensors, config, notes


def _restrictions(s: _Source) -> tuple[Any, Any, Any]:
    raw = s.cfg.raw
    return tuple(None if raw.get(k) in (None, [], "", {}) else raw.get(k)  # type: ignore[return-value]
                 for k in ("layers_to_transform", "layers_pattern", "exclude_modules"))


def _base_config(srcs: list[_Source], *, r: int, alpha: float, use_rslora: bool, target_modules: Any,
                 modules_to_save: Optional[list[str]], lora_bias: bool = False) -> dict[str, Any]:
    first = srcs[0]
    base = next((s.cfg.base_model_name_or_path for s in srcs if s.cfg.base_model_name_or_path), None)
    revision = next((s.cfg.revision for s in srcs if s.cfg.revision), None)
    return {
        "peft_type": "LORA",
        "task_type": first.cfg.task_type,
        "base_model_name_or_path": base,
        "revision": revision,
        "r": int(r),
        "lora_alpha": int(alpha),
        "use_rslora": bool(use_rslora),
        "use_dora": False,
        "fan_in_fan_out": bool(first.cfg.fan_in_fan_out),
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


# --- PEFT add_weighted_adapter --------------------------------------------------------------------
# peft/utils/merge_utils.py of PEFT 0.21.2, operation for operation (same RNG use, same rounding).


def _prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    elif density < 0:
        raise CombinationArgumentError(f"density must be >= 0, got {density}.")
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        k = int(density * tensor.numel())
        top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
        mask[top_k[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    pruned = tensor * mask
    if rescale:
        pruned = pruned / density
    return pruned


def _reshape_weights(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _majority_sign_mask(tensor: torch.Tensor, method: str) -> torch.Tensor:
    sign = tensor.sign()
    if method == "total":
        sign_magnitude = tensor.sum(dim=0)
    else:
        sign_magnitude = sign.sum(dim=0)
    majority_sign = torch.where(sign_magnitude >= 0, 1, -1)
    return sign == majority_sign


def _disjoint_merge(task_tensors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mixed = (task_tensors * mask).sum(dim=0)
    return mixed / torch.clamp(mask.sum(dim=0), min=1.0)


def _weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(tensors, dim=0)
    return (stacked * _reshape_weights(stacked, weights)).sum(dim=0)


def _combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: Optional[float],
             sign_method: str) -> torch.Tensor:
    if kind == "linear":  # task_arithmetic
        return _weighted_sum(tensors, weights)
    if kind == "magnitude_prune":
        return _weighted_sum([_prune(t, density, "magnitude") for t in tensors], weights)  # type: ignore[arg-type]
    if kind == "dare_linear":
        return _weighted_sum([_prune(t, density, "random", rescale=True) for t in tensors], weights)  # type: ignore[arg-type]
    if kind in ("ties", "dare_ties"):
        if kind == "ties":
            pruned = [_prune(t, density, "magnitude") for t in tensors]  # type: ignore[arg-type]
        else:
            pruned = [_prune(t, density, "random", rescale=True) for t in tensors]  # type: ignore[arg-type]
        stacked = torch.stack(pruned, dim=0)
        mask = _majority_sign_mask(stacked, sign_method)
        weighted = stacked * _reshape_weights(stacked, weights)
        return _disjoint_merge(weighted, mask)
    raise AssertionError(kind)


@dataclass
class _Term:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    weight: float


def _replay_injection_rng(init: Any, rank: int, shape: _ModuleShape) -> None:
    """The random draws PEFT makes when it injects the new adapter into one layer (update_layer)."""
    if shape.is_embedding:
        a = torch.randn((rank, shape.in_features))
        b = torch.randn((shape.out_features, rank))
        if init:  # reset_lora_parameters, embedding branch
            torch.nn.init.zeros_(a)
            torch.nn.init.normal_(b)
        return
    lora_a = torch.nn.Linear(shape.in_features, rank, bias=False)
    torch.nn.Linear(rank, shape.out_features, bias=False)
    if init is True:
        torch.nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    elif isinstance(init, str) and init.lower() == "gaussian":
        torch.nn.init.normal_(lora_a.weight, std=1 / rank)


def _svd_module(kind: str, terms: list[_Term], new_rank: int, transposed: bool, density, sign_method, clamp,
                full_matrices: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # get_delta_weight: transpose(B @ A, fan_in_fan_out or embedding) * scaling
    deltas = [((t.b @ t.a).T if transposed else (t.b @ t.a)) * t.scale for t in terms]
    weights = torch.tensor([t.weight for t in terms])
    base_kind = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties",
                 "magnitude_prune_svd": "magnitude_prune"}[kind]
    delta = _combine(base_kind, deltas, weights, density, sign_method)
    if transposed:
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    U = U[:, :new_rank]
    S = S[:new_rank]
    U = U @ torch.diag(S)
    Vh = Vh[:new_rank, :]
    if clamp is not None:
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi_val = torch.quantile(dist, clamp)
        low_val = -hi_val
        U = U.clamp(low_val, hi_val)
        Vh = Vh.clamp(low_val, hi_val)
    return Vh, U


def _task_arithmetic_module(kind: str, terms: list[_Term], density, sign_method) -> tuple[torch.Tensor, torch.Tensor]:
    weights_a, weights_b = [], []
    for t in terms:
        ws = t.weight * t.scale
        sign = 1 if ws >= 0 else -1
        weights_a.append(math.sqrt(abs(ws)) * sign)
        weights_b.append(math.sqrt(abs(ws)))
    out = []
    for tensors, w in (([t.a for t in terms], torch.tensor(weights_a)), ([t.b for t in terms], torch.tensor(weights_b))):
        out.append(_combine(kind, tensors, w, density, sign_method).to(tensors[0].dtype))
    return out[0], out[1]


def _peft_combination(srcs: list[_Source], ctype: str, shapes: dict[str, _ModuleShape], *, svd_rank, svd_clamp,
                      density, majority_sign_method, seed, base_model_dir):
    notes: list[str] = []
    first = srcs[0]
    for s in srcs:
        if s.cfg.lora_bias:
            raise UnsupportedCombinationError(
                f"Adapter {s.name!r} trains LoRA biases (lora_bias); PEFT's add_weighted_adapter ignores them and "
                f"leaves the new adapter's bias at its random initial value, so {ctype!r} has no exact result. Use "
                "combination type 'stack', which sums the biases."
            )
    biased = [s.name for s in srcs if str(s.cfg.raw.get("bias", "none")) != "none"]
    if len(biased) > 1 or (biased and first.cfg.raw.get("bias", "none") != "none"):
        raise IncompatibleAdaptersError(
            f"Adapters {', '.join(biased)} train the base biases (bias != 'none'); PEFT supports only one such adapter, "
            "and not as the first one. Put it later in the list, or use combination type 'stack'."
        )
    init = first.cfg.raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() == "gaussian":
        init = "gaussian"
    if init not in _INIT_OK:
        raise UnsupportedCombinationError(
            f"The first adapter {first.name!r} has init_lora_weights={init!r}. PEFT's add_weighted_adapter re-runs the "
            "first adapter's initialisation for the new adapter, and this one reads or rewrites the base weights, "
            "so the combination is not a plain LoRA. Put another adapter first, or use combination type 'stack'."
        )
    restrictions = {_restrictions(s) for s in srcs}
    if len(restrictions) > 1:
        raise IncompatibleAdaptersError(
            "The adapters use different layers_to_transform / layers_pattern / exclude_modules. PEFT's "
            "add_weighted_adapter would apply the first adapter's to all of them (dropping or failing on the others' "
            "layers). Use combination type 'stack', which keeps every adapter's own layers."
        )
    # PEFT: more than one adapter with modules_to_save on one module -> ValueError.
    _check_modules_to_save_conflicts(srcs, f"PEFT's add_weighted_adapter ({ctype})")

    effective = "linear" if len(srcs) == 1 else ctype
    ranks = [s.max_rank for s in srcs]
    if effective in EQUAL_RANK_TYPES:
        if len(set(ranks)) != 1:
            raise IncompatibleAdaptersError(
                f"Combination type {effective!r} needs adapters of equal rank (like PEFT's linear, ties, dare_ties, "
                f"dare_linear and magnitude_prune), but the ranks are "
                + ", ".join(f"{s.name}: {r}" for s, r in zip(srcs, ranks))
                + ". Use 'stack' or 'cat' (exact, any ranks) or an *_svd type (any ranks, truncated to svd_rank)."
            )
        new_rank = ranks[0]
    elif effective == "cat":
        new_rank = sum(ranks)
    else:
        if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 0):
            raise CombinationArgumentError(f"svd_rank must be a positive integer (or None for the largest rank), got {svd_rank!r}.")
        new_rank = svd_rank or max(ranks)

    kinds = {type(s.cfg.target_modules) for s in srcs}
    kinds = {set if k in (list, tuple, set) else k for k in kinds}
    if len(kinds) > 1:
        raise IncompatibleAdaptersError(
            "The adapters' target_modules are of different kinds (some a list of names, some a regex string: "
            + ", ".join(f"{s.name}: {s.cfg.target_modules!r}" for s in srcs)
            + "). PEFT's add_weighted_adapter cannot combine those; use combination type 'stack'."
        )
    kind = kinds.pop()
    if kind is str:
        target_modules: Any = "|".join(f"({s.cfg.target_modules})" for s in srcs)
    elif kind is set:
        target_modules = sorted({str(t) for s in srcs for t in s.cfg.target_modules})
    else:
        raise IncompatibleAdaptersError(
            f"Adapter {first.name!r} has target_modules={first.cfg.target_modules!r}; PEFT needs a list or a regex "
            "string to combine adapters. Use combination type 'stack'."
        )

    if effective in DENSITY_TYPES:
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density):
            raise CombinationArgumentError(
                f"Combination type {effective!r} needs density, the fraction of values kept (0..1), e.g. density=0.5."
            )
        if density < 0 or density > 1:
            raise CombinationArgumentError(f"density must be between 0 and 1 (fraction of values kept), got {density}.")
    if effective in SIGN_TYPES and majority_sign_method not in ("total", "frequency"):
        raise CombinationArgumentError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}."
        )
    if effective in SVD_TYPES and svd_clamp is not None and (
        isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1
    ):
        raise CombinationArgumentError(f"svd_clamp is a quantile between 0 and 1 (e.g. 0.99), got {svd_clamp!r}.")

    # modules_to_save: PEFT gives the new adapter fresh copies of the *original* modules.
    tensors, dropped = _collect_replacements(srcs, keep_modules_to_save=False)
    if dropped:
        notes.append(
            "PEFT's add_weighted_adapter does not carry modules_to_save over (the combined adapter uses the base "
            f"weights there); left out: {', '.join(dropped)}. Use combination type 'stack' to keep them."
        )
    if first.cfg.use_rslora:
        notes.append(
            f"As in PEFT, the combined adapter keeps use_rslora from the first adapter {first.name!r}: with "
            f"r = lora_alpha = {new_rank} its scale is sqrt({new_rank}) = {math.sqrt(new_rank):.4g}, not 1."
        )

    modules = list(shapes)
    if effective in SVD_TYPES:
        for m in modules:
            limit = min(shapes[m].in_features, shapes[m].out_features)
            if new_rank > limit:
                raise CombinationArgumentError(
                    f"svd rank {new_rank} is larger than {m}'s smaller dimension {limit} (PEFT would fail there); "
                    f"pass svd_rank <= {limit}."
                )
    if effective in RANDOM_TYPES:
        modules, order_info = _order_modules(modules, srcs, base_model_dir)
        if order_info.startswith("name heuristic"):
            notes.append(
                f"{effective} is random: the module order for PEFT-identical random masks came from a name heuristic; "
                "pass base_model_dir (a folder with the base's config.json) to use the real order."
            )
    else:
        modules = sorted(modules, key=_heuristic_key)
        order_info = "not needed (deterministic)"

    def compute() -> None:
        if effective in RANDOM_TYPES:
            for m in modules:
                _replay_injection_rng(init, new_rank, shapes[m])
        for m in modules:
            shape = shapes[m]
            terms = []
            for s in srcs:
                if m in s.weights.lora_modules:
                    a, b = _ab(s, m)
                    terms.append(_Term(a, b, s.cfg.scale_for(m), s.weight))
            if effective == "cat":
                a_new = torch.cat([t.a * t.weight * t.scale for t in terms], dim=0)
                b_new = torch.cat([t.b for t in terms], dim=1)
            elif effective in SVD_TYPES:
                transposed = shape.is_embedding or first.cfg.fan_in_fan_out
                full = max(shape.in_features, shape.out_features) ** 2 <= _FULL_SVD_LIMIT
                if not full:
                    reduced.append(m)
                a_new, b_new = _svd_module(effective, terms, new_rank, transposed, density, majority_sign_method,
                                           svd_clamp, full)
            else:
                shapes_seen = {(tuple(t.a.shape), tuple(t.b.shape)) for t in terms}
                if len(shapes_seen) > 1:
                    raise IncompatibleAdaptersError(
                        f"{m}: the adapters give this module different ranks (rank_pattern), which {effective!r} cannot "
                        "add up (PEFT fails here too). Use 'stack', 'cat' or an *_svd type."
                    )
                a_new, b_new = _task_arithmetic_module(effective, terms, density, majority_sign_method)
            if a_new.shape[0] > new_rank:
                raise IncompatibleAdaptersError(f"{m}: combined rank {a_new.shape[0]} exceeds the adapter rank {new_rank}.")
            a_new, b_new = _pad(a_new.to(torch.float32), b_new.to(torch.float32), new_rank)
            key_a, key_b = _lora_keys(m, shape.is_embedding)
            tensors[key_a], tensors[key_b] = a_new, b_new

    reduced: list[str] = []
    if effective in RANDOM_TYPES and seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            compute()
    else:
        compute()
    if reduced:
        notes.append(
            f"Reduced SVD (full_matrices=False) instead of PEFT's full SVD for {len(reduced)} large module(s) "
            f"({', '.join(reduced[:3])}{', ...' if len(reduced) > 3 else ''}) to bound memory; the result equals "
            "PEFT's up to float rounding (~1e-7)."
        )

    config = _base_config(srcs, r=new_rank, alpha=new_rank, use_rslora=first.cfg.use_rslora,
                          target_modules=target_modules, modules_to_save=None)
    lt, lp, ex = _restrictions(first)
    config.update(layers_to_transform=lt, layers_pattern=lp, exclude_modules=ex)
    params: dict[str, Any] = {"svd_full_matrices": True}
    if effective in SVD_TYPES:
        params.update(svd_rank=svd_rank, svd_clamp=svd_clamp)
    if effective in DENSITY_TYPES:
        params["density"] = density
    if effective in SIGN_TYPES:
        params["majority_sign_method"] = majority_sign_method
    if effective in RANDOM_TYPES:
        params["seed"] = seed
    if effective not in SVD_TYPES:
        params.pop("svd_full_matrices")
    return tensors, config, notes, effective, params, order_info


# --- output ---------------------------------------------------------------------------------------


def _write(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / ADAPTER_SAFETENSORS
    config_path = out_dir / ADAPTER_CONFIG
    tmp_weights = out_dir / f".{ADAPTER_SAFETENSORS}.tmp"
    tmp_config = out_dir / f".{ADAPTER_CONFIG}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_config, config_path)


__all__ = [
    "COMBINATION_TYPES",
    "AdapterSource",
    "CombinationArgumentError",
    "DifferentBaseModelsError",
    "IncompatibleAdaptersError",
    "UnknownCombinationTypeError",
    "UnsupportedCombinationError",
    "combine_adapters",
    "requirements_text",
]
