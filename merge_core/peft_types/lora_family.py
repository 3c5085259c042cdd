"""AdaLoRA, HiRA and the LoRA variants the LoRA planner lacks: block-diagonal LoRA, KaSA, LoRA on nn.Parameter.

All are low-rank products in the stored orientation, scale * left @ right, with the factors assembled at
load time from the adapter's tensors (AdaLoRA's singular values, KaSA's diagonal, bdlora's blocks); HiRA
multiplies the base weight elementwise by its product instead of adding it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .common import (
    AdapterContext,
    ModuleInput,
    check_rank,
    configured_alpha,
    configured_rank,
    linear_features,
    lora_bias_missing,
    mismatch,
    number,
    refuse,
    require,
    require_matrix,
)
from .lora_specs import BaseResidualSpec, DeloraSpec, ExpertLowRankSpec, HiraSpec
from .specs import AddSpec, Factor, LowRankSpec, Spec

ADALORA_TOKENS = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B", "ranknum")
DELORA_TOKENS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
HIRA_TOKENS = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")
LORA_TOKENS = ("lora_A", "lora_B", "lora_diag", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


def _oriented(left: Factor, right: Factor, transposed: bool) -> tuple[Factor, Factor]:
    """(left, right) of B @ A in the stored orientation: stored (in, out) takes (B @ A)^T = A^T @ B^T."""
    return (right.flipped(), left.flipped()) if transposed else (left, right)


def _check_ab(module: ModuleInput, a_shape, b_shape, *, in_f: int, out_f: int, what: str) -> int:
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f or a_shape[0] != b_shape[1]:
        raise mismatch(
            module.name, f"{what} factors A {list(a_shape)} and B {list(b_shape)} do not fit a {in_f} -> {out_f} layer"
        )
    return a_shape[0]


# --- AdaLoRA -------------------------------------------------------------------------------------------------


def adalora_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """B @ (A * E) * scaling / (ranknum + 1e-5); ranknum is init_r even after AdaLoRA pruned the rank."""
    if "lora_embedding_A" in module.keys:
        raise refuse("ADALORA", module.name, "targets an embedding, which PEFT does not wrap with AdaLoRA")
    out_f, in_f = linear_features("ADALORA", module)
    a, b, e = require(module.name, module.keys, "lora_A", "lora_B", "lora_E")
    rank = _check_ab(module, context.shapes[a], context.shapes[b], in_f=in_f, out_f=out_f, what="AdaLoRA")
    if tuple(context.shapes[e]) not in ((rank, 1), (rank,)):
        raise mismatch(module.name, f"lora_E has shape {list(context.shapes[e])}, expected [{rank}, 1]")
    init_r = number(context.config, "init_r", 12, kind=int)
    check_rank(module.name, rank, _adalora_rank(module.name, context.config, init_r))
    if rank == 0:
        return []  # every singular value was pruned: no change
    alpha = number(context.config, "lora_alpha", 8.0)
    scaling = alpha if alpha > 0 else float(rank)
    left, right = _oriented(Factor(b), Factor(a, vector_key=e, vector_axis=0), module.stored_transposed)
    scale = scaling / (init_r + 1e-5)
    return [LowRankSpec(module.name, "weight", left, right, scale, f"adalora r={rank} init_r={init_r} alpha={alpha:g}")]


def _adalora_rank(module: str, config: Mapping[str, Any], init_r: int) -> int:
    """The rank PEFT gives the module on load: the kept entries of its rank_pattern mask, else init_r."""
    for name, mask in (config.get("rank_pattern") or {}).items():
        name = name.removesuffix(".default").removesuffix(".lora_E")
        if name == module and isinstance(mask, list):
            return sum(bool(m) for m in mask)
    return init_r


# --- LoRA variants -------------------------------------------------------------------------------------------


def _lora_scale(config: Mapping[str, Any], key: str) -> tuple[int, float, float]:
    r, alpha = configured_rank(config, key), configured_alpha(config, key, alpha_key="lora_alpha")
    return r, alpha, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


# PEFT re-runs these initialisations when it loads an unconverted adapter, replacing the base by a residual
# before the saved B A is added. PiSSA (full SVD) and OLoRA (QR) are deterministic and reproduced; PiSSA with
# niter draws a random sketch, CorDA needs calibration data, LoftQ quantizes, LoRA-GA needs gradients.
_RESIDUAL_INITS = ("pissa", "olora")
_BASE_CHANGING_INITS = ("pissa_niter", "corda", "loftq", "lora_ga")
_STRUCTURAL = {
    "use_qalora": "QA-LoRA (its update pools input groups)",
    "layer_replication": "layer replication (it duplicates layers)",
    "megatron_config": "Megatron-parallel LoRA",
}


def requested_variants(config: Mapping[str, Any]) -> list[str]:
    """The LoRA variants the config turns on, read the way PEFT's resolve_lora_variant reads them."""
    import dataclasses

    from peft import LoraConfig

    found = []
    for f in dataclasses.fields(LoraConfig):
        if f.name == "init_lora_weights":
            found += [v for v in f.metadata.get("lora_variants", ()) if config.get(f.name) == v]
        elif f.metadata.get("is_lora_variant") and config.get(f.name) not in (None, False, {}, [], ""):
            found.append(f.name)
    return found


def check_lora_config(where: str, config: Mapping[str, Any]) -> None:
    """Refuse what no LoRA module of this config can merge, before any module is resolved: a variant this tool does
    not reproduce, a structural option, a base-changing initialisation. ``where`` opens the message."""
    for name in requested_variants(config):
        if name not in ("use_dora", "use_bdlora", "kasa_config"):
            raise refuse("LORA", where, f"uses the LoRA variant {name}, whose merge this tool does not reproduce")
    if "use_dora" in requested_variants(config) and needs_lora_variants(config):
        # DoRA renormalises whole columns of W + delta: the LoRA planner merges it, the registry's row ops cannot.
        raise refuse(
            "LORA",
            where,
            "combines DoRA with trainable_token_indices, target_parameters, use_bdlora, kasa_config or an "
            "unconverted PiSSA/OLoRA init (merge it with PEFT's merge_and_unload() instead)",
        )
    for name, what in _STRUCTURAL.items():
        if config.get(name) not in (None, False, {}, [], ""):
            raise refuse("LORA", where, f"uses {what}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise refuse(
            "LORA",
            where,
            f"was saved with init_lora_weights={init!r} without conversion to plain LoRA (PEFT rebuilds a residual "
            "base when it loads it; convert it with PEFT's path_initial_model_for_weight_conversion)",
        )


def _check_lora_options(module: str, config: Mapping[str, Any]) -> None:
    check_lora_config(module, config)
    if "use_dora" in requested_variants(config):
        raise refuse("LORA", module, "uses DoRA, which the LoRA planner (plan_lora) merges, not this registry")


def lora_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """LoRA with use_bdlora, kasa_config, lora_bias or an unconverted PiSSA/OLoRA init on a Linear-like layer,
    or LoRA on nn.Parameter."""
    _check_lora_options(module.name, context.config)
    if module.params:
        return parameter_ops(module, context)
    for role, what in (("lora_magnitude_vector", "uses DoRA"), ("lora_embedding_A", "targets an embedding")):
        if role in module.keys:
            raise refuse("LORA", module.name, f"{what}, which the LoRA planner (plan_lora) merges, not this registry")
    config = context.config
    out_f, in_f = linear_features("LORA", module)
    a, b = require(module.name, module.keys, "lora_A", "lora_B")
    a_shape, b_shape = tuple(context.shapes[a]), tuple(context.shapes[b])
    r, alpha, scale = _lora_scale(config, module.name)
    nblocks = _bdlora_blocks(module, config, a_shape, b_shape, in_f=in_f, out_f=out_f)
    a_blocks = nblocks if a_shape[1] * nblocks == in_f and nblocks > 1 else 0
    b_blocks = nblocks if b_shape[1] * nblocks == a_shape[0] and nblocks > 1 else 0
    full_a = (a_shape[0], a_shape[1] * (a_blocks or 1))
    full_b = (b_shape[0], b_shape[1] * (b_blocks or 1))
    check_rank(module.name, _check_ab(module, full_a, full_b, in_f=in_f, out_f=out_f, what="LoRA"), r)
    left, right = Factor(b, block_diag=b_blocks), Factor(a, block_diag=a_blocks)
    label = f"lora r={r} alpha={alpha:g}" + (" bdlora" if nblocks > 1 else "")
    specs: list[Spec] = []
    if config.get("kasa_config"):
        (diag,) = require(module.name, module.keys, "lora_diag")
        if module.stored_transposed:
            raise refuse("LORA", module.name, "uses KaSA on a weight stored (in, out), which PEFT refuses")
        if r >= min(out_f, in_f):
            raise mismatch(module.name, f"KaSA drops the {r} smallest singular components of a {out_f} x {in_f} weight")
        left = Factor(b, vector_key=diag, vector_axis=1)
        specs.append(BaseResidualSpec(module.name, "weight", r, "kasa"))
        label += " kasa"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in _RESIDUAL_INITS:
        specs.append(_residual(module, init.lower(), r, scale, out_f=out_f, in_f=in_f))
        label += f" {init.lower()}"
    left, right = _oriented(left, right, module.stored_transposed)
    specs.append(LowRankSpec(module.name, "weight", left, right, scale, label))
    if "lora_B.bias" in module.keys:
        if not module.has_bias:
            raise mismatch(module.name, "the adapter trains a bias (lora_bias) but the base layer has none")
        specs.append(AddSpec(module.name, "bias", module.keys["lora_B.bias"], scale))
    elif config.get("lora_bias"):
        raise lora_bias_missing(module.name)
    return specs


def _residual(module: ModuleInput, kind: str, r: int, scale: float, *, out_f: int, in_f: int) -> Spec:
    if kind == "olora" and module.stored_transposed:
        raise refuse("LORA", module.name, "uses OLoRA on a weight stored (in, out), which PEFT initialises wrongly")
    if r > min(out_f, in_f):
        raise mismatch(module.name, f"{kind} takes {r} components of a {out_f} x {in_f} weight")
    return BaseResidualSpec(module.name, "weight", r, kind, scale)


def _bdlora_blocks(module: ModuleInput, config: Mapping[str, Any], a_shape, b_shape, *, in_f: int, out_f: int) -> int:
    bd = config.get("use_bdlora")
    if not bd:
        return 1
    if module.stored_transposed:
        raise refuse("LORA", module.name, "uses block-diagonal LoRA on a weight stored (in, out), which PEFT refuses")
    nblocks = int(bd.get("nblocks", 1)) if isinstance(bd, Mapping) else 1
    if nblocks < 1 or in_f % nblocks or out_f % nblocks:
        raise mismatch(module.name, f"bdlora's {nblocks} blocks do not divide the layer's {in_f} -> {out_f} features")
    return nblocks


# --- LoRA on nn.Parameter (target_parameters) -----------------------------------------------------------------


def _targeted_params(module: ModuleInput, config: Mapping[str, Any]) -> list[str]:
    targets = config.get("target_parameters") or []
    return [
        p
        for p in module.params
        if any(f"{module.name}.{p}" == t or f"{module.name}.{p}".endswith("." + t) for t in targets)
    ]


def parameter_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """PEFT nests one ParamWrapper per targeted parameter, in the module's parameter order, the first innermost:
    the wrapper with the most ``.base_layer`` infixes belongs to the first targeted parameter."""
    depths = sorted({int(role.partition("@")[2] or 0) for role in module.keys if role.startswith("lora_A")})
    params = _targeted_params(module, context.config)
    if len(params) != len(depths):
        raise mismatch(
            module.name,
            f"the adapter wraps {len(depths)} parameter(s) but target_parameters matches "
            f"{len(params)} of the base's ({', '.join(module.params) or 'none'})",
        )
    specs: list[Spec] = []
    for param, depth in zip(params, reversed(depths), strict=True):
        suffix = f"@{depth}" if depth else ""
        a, b = require(module.name, module.keys, "lora_A" + suffix, "lora_B" + suffix)
        specs.append(_parameter_spec(module, context, param, a, b))
    return specs


def _parameter_spec(module: ModuleInput, context: AdapterContext, param: str, a: str, b: str) -> Spec:
    shape, a_shape, b_shape = tuple(module.params[param]), tuple(context.shapes[a]), tuple(context.shapes[b])
    r, alpha, scale = _lora_scale(context.config, f"{module.name}.{param}")
    where = f"{module.name}.{param}"
    if len(shape) == 2:
        check_rank(where, _check_ab(module, a_shape, b_shape, in_f=shape[1], out_f=shape[0], what="LoRA"), r)
        return LowRankSpec(module.name, param, Factor(b), Factor(a), scale, f"lora r={r} alpha={alpha:g}")
    if len(shape) != 3:
        raise refuse("LORA", where, f"targets a {len(shape)}-D parameter; PEFT wraps 2-D and 3-D parameters only")
    experts, d1, d2 = shape
    out_f, in_f = b_shape[0], a_shape[-1]
    if a_shape[0] != experts * r or b_shape[1] != experts * r:
        raise mismatch(
            where, f"LoRA factors A {list(a_shape)} and B {list(b_shape)} do not hold rank {r} for {experts} experts"
        )
    if (d1, d2) == (out_f, in_f) and (d1 != d2 or not module.stored_transposed):
        transposed = False
    elif (d1, d2) == (in_f, out_f):
        transposed = True
    else:
        raise mismatch(where, f"LoRA maps {in_f} -> {out_f} features but the parameter has shape {list(shape)}")
    return ExpertLowRankSpec(module.name, param, a, b, experts, r, scale, alpha, transposed)


# --- HiRA ------------------------------------------------------------------------------------------------------


def hira_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """W + W * (B @ A): the low-rank product gates the base weight elementwise (embeddings: (B @ A)^T)."""
    embedding = "hira_embedding_A" in module.keys
    prefix = "hira_embedding_" if embedding else "hira_"
    a, b = require(module.name, module.keys, prefix + "A", prefix + "B")
    if embedding:
        rows, cols = require_matrix("HIRA", module)
        out_f, in_f, transposed = cols, rows, True  # PEFT's embedding delta is (B @ A)^T, B (dim, r), A (r, rows)
    else:
        out_f, in_f = linear_features("HIRA", module)
        transposed = module.stored_transposed
    rank = _check_ab(module, context.shapes[a], context.shapes[b], in_f=in_f, out_f=out_f, what="HiRA")
    left, right = _oriented(Factor(b), Factor(a), transposed)
    return [HiraSpec(module.name, "weight", left, right, rank)]


# --- DeLoRA ----------------------------------------------------------------------------------------------------


def delora_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    """Normalised low-rank delta on Linear, its columns scaled by the base column norms saved with the adapter."""
    if module.stored_transposed:
        raise refuse("DELORA", module.name, "targets a weight stored (in, out), which PEFT does not wrap with DeLoRA")
    out_f, in_f = linear_features("DELORA", module)
    a, b, lam, w_norm = require(module.name, module.keys, "delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    rank = _check_ab(module, context.shapes[a], context.shapes[b], in_f=in_f, out_f=out_f, what="DeLoRA")
    check_rank(module.name, rank, configured_rank(context.config, module.name))
    if math.prod(context.shapes[w_norm]) != in_f:
        raise mismatch(module.name, f"delora_w_norm has {math.prod(context.shapes[w_norm])} entries, not {in_f}")
    return [DeloraSpec(module.name, "weight", a, b, lam, w_norm, rank)]


def needs_lora_variants(config: Mapping[str, Any]) -> bool:
    """Whether a LoRA config uses anything beyond plain LoRA/rsLoRA/DoRA/embeddings/lora_bias (the LoRA planner's
    domain): a LoRA variant, LoRA on parameters, trainable tokens, a structural option, or a base-changing init."""
    if [v for v in requested_variants(config) if v != "use_dora"]:
        return True
    if any(
        config.get(k) not in (None, False, {}, [], "")
        for k in (*_STRUCTURAL, "target_parameters", "trainable_token_indices")
    ):
        return True
    init = config.get("init_lora_weights")
    return isinstance(init, str) and init.lower().startswith((*_RESIDUAL_INITS, *_BASE_CHANGING_INITS))
