"""One declarative record per PEFT type: its adapter keys, how its config scales, and its planner (or why not).

Every member of ``peft.utils.PeftType`` has a record: either merged exactly, row block by row block, by
the specs its ``module_ops`` returns, or refused by name with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UnsupportedAdapterError
from .common import AdapterContext, ModuleInput, ModuleKeys, Shape, parse_keys
from .lora_family import (
    ADALORA_TOKENS,
    DELORA_TOKENS,
    HIRA_TOKENS,
    LORA_TOKENS,
    adalora_ops,
    check_lora_config,
    delora_ops,
    hira_ops,
    lora_ops,
)
from .lycoris import LOHA_TOKENS, LOKR_TOKENS, loha_ops, lokr_ops
from .rotations import BOFT_TOKENS, HRA_TOKENS, OFT_TOKENS, boft_ops, hra_ops, oft_ops
from .specs import Spec
from .spectral import FOURIERFT_TOKENS, fourierft_ops
from .vector_bank import VBLORA_SHARED, VBLORA_TOKENS, vblora_ops
from .vectors import (
    IA3_TOKENS,
    LN_TUNING_TOKENS,
    TOKENS_TOKENS,
    ia3_ops,
    ln_tuning_ops,
    tokens_ops,
)
from .vera import PVERA_SHARED, PVERA_TOKENS, VERA_SHARED, VERA_TOKENS, largest_layer, pvera_ops, vera_ops

Status = Literal["merged", "refused"]
ModuleOps = Callable[[ModuleInput, AdapterContext], list[Spec]]


@dataclass(frozen=True)
class PeftTypeRecord:
    """What this tool knows about one PEFT type."""

    peft_type: str
    status: Status
    reason: str  # merged: what is covered and how the config scales it; refused: why, in one clause
    tokens: tuple[str, ...] = ()  # the adapter key parts that name its tensors ("hada_w1_a", "ia3_l", ...)
    shared_tokens: tuple[str, ...] = ()  # model-level tensors shared by every module (VeRA's projections)
    ops: ModuleOps | None = None
    # Refusals that depend on the config alone, run when adapter_config.json is read: (where, config) -> None.
    config_check: Callable[[str, Mapping[str, Any]], None] | None = None

    def check_config(self, where: str, config_raw: Mapping[str, Any]) -> None:
        """Raise UnsupportedAdapterError, opening with ``where``, for a config no module of it could merge."""
        if self.config_check is not None:
            self.config_check(where, config_raw)

    def parse_adapter(self, keys: Iterable[str]) -> dict[str, ModuleKeys]:
        """{module name: {role: adapter key}}; module names carry no ``base_model.model.`` prefix.

        Keys of other kinds (modules_to_save copies, saved embeddings, trained base biases) are left out:
        the LoRA planner's replacement rules handle them. Shared tensors come from ``shared_keys``.
        """
        modules = parse_keys(keys, self.tokens + TOKENS_TOKENS if self.peft_type == "LORA" else self.tokens)
        # LoRA's trainable_token_indices saves "<embedding>.token_adapter.trainable_tokens_delta".
        return {m.removesuffix(".token_adapter"): roles for m, roles in modules.items()}

    def shared_keys(self, keys: Iterable[str]) -> dict[str, str]:
        """{"vera_A": key, "vera_B": key} for the model-level tensors of this type present in ``keys``."""
        found: dict[str, str] = {}
        for key in keys:
            parts = [p for p in key.split(".") if p not in ("base_model", "model")]
            for token in self.shared_tokens:
                if parts and (parts[0] == token) and len(parts) <= 2:
                    found[token] = key
        return found

    def unclaimed_keys(self, keys: Iterable[str]) -> list[str]:
        """Adapter keys this type's planner does not use: modules_to_save copies, saved embeddings, trained base
        biases (bias="all"), or tensors of a kind this tool does not know; the LoRA planner's rules place the first
        three, anything else deserves a refusal."""
        keys = list(keys)
        claimed = {k for roles in self.parse_adapter(keys).values() for k in roles.values()}
        claimed |= set(self.shared_keys(keys).values())
        return [k for k in keys if k not in claimed]

    def context(
        self, config_raw: Mapping[str, Any], adapter_shapes: Mapping[str, Shape], modules: Mapping[str, ModuleInput]
    ) -> AdapterContext:
        """The adapter-wide facts ``module_ops`` needs, from every module the planner resolved."""
        largest = None
        if self.peft_type in ("VERA", "PVERA") and modules:
            largest = largest_layer({m.name: _out_in(m) for m in modules.values()})
        return AdapterContext(config_raw, adapter_shapes, self.shared_keys(adapter_shapes), largest)

    def module_ops(
        self,
        module_name: str,
        adapter_keys_of_module: ModuleKeys,
        config_raw: Mapping[str, Any],
        base_shape: Shape,
        *,
        stored_transposed: bool,
        adapter_shapes: Mapping[str, Shape],
        has_bias: bool = False,
        params: Mapping[str, Shape] | None = None,
        context: AdapterContext | None = None,
    ) -> list[Spec]:
        """The specs that turn the module's stored weight (and bias) into PEFT's merged ones, in order.

        Raises a merge_core error naming the module when shapes do not fit, and UnsupportedAdapterError
        naming the type when it (or this use of it) cannot be merged exactly.
        """
        module = ModuleInput(
            module_name,
            dict(adapter_keys_of_module),
            tuple(base_shape),
            stored_transposed,
            has_bias,
            dict(params or {}),
        )
        if self.ops is None:
            raise unsupported(self)
        if context is None:
            # One module alone cannot know VeRA's largest layer: regenerated projections then ask for plan_adapter.
            context = AdapterContext(config_raw, adapter_shapes, self.shared_keys(adapter_shapes))
        return self.ops(module, context)


def _out_in(module: ModuleInput) -> tuple[int, int]:
    rows, cols = module.base_shape[0], module.base_shape[-1]
    return (cols, rows) if module.stored_transposed else (rows, cols)


def _lora_variant_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    specs: list[Spec] = []
    if "trainable_tokens_delta" in module.keys:
        specs += tokens_ops(module, context)
    if any(role.startswith("lora_") for role in module.keys):
        specs += lora_ops(module, context)
    return specs


def unsupported(record: PeftTypeRecord) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"This tool cannot merge this {record.peft_type} adapter: {record.reason}.")


def _merged(
    peft_type: str, reason: str, tokens: tuple[str, ...], ops: ModuleOps, shared=(), config_check=None
) -> PeftTypeRecord:
    return PeftTypeRecord(peft_type, "merged", reason, tokens, tuple(shared), ops, config_check)


def _refused(peft_type: str, reason: str) -> PeftTypeRecord:
    return PeftTypeRecord(peft_type, "refused", reason)


_PROMPT = (
    "it is prompt learning, which feeds learned virtual tokens or key/value prefixes to an unchanged model, "
    "so no weight changes and there is nothing to merge; load it with PEFT on top of the base model"
)
_NOT_YET = (
    "PEFT can merge it but this tool does not yet reproduce its merge row block by row block; merge it "
    "with PEFT's merge_and_unload() and load the merged model instead"
)

_RECORDS: tuple[PeftTypeRecord, ...] = (
    _merged(
        "LORA",
        "plain LoRA, rsLoRA, DoRA and embeddings by the LoRA planner; here the variants it lacks: "
        "use_bdlora (block-diagonal A or B, expanded to full factors), kasa_config (scale * B diag(lora_diag) A "
        "on the base minus its r smallest singular components), lora_bias, target_parameters (nn.Parameter, "
        "3-D fused experts), trainable_token_indices, and unconverted init_lora_weights='pissa'/'olora' (the "
        "residual base PEFT rebuilds on load); scale alpha/r (alpha/sqrt(r) with use_rslora) with "
        "rank_pattern/alpha_pattern",
        LORA_TOKENS,
        _lora_variant_ops,
        config_check=check_lora_config,
    ),
    _merged(
        "ADALORA",
        "B (A * E) * lora_alpha / (init_r + 1e-5) on Linear and Conv1D (fan_in_fan_out); pruned ranks "
        "are already cut from the saved tensors",
        ADALORA_TOKENS,
        adalora_ops,
    ),
    _merged(
        "IA3",
        "W * l on Linear and Conv1D: l scales output rows (and the bias), or input columns on "
        "feedforward_modules; fan_in_fan_out follows the layer",
        IA3_TOKENS,
        ia3_ops,
    ),
    _merged("LOHA", "(w1a w1b) * (w2a w2b) * alpha/r on Linear (rank_pattern/alpha_pattern)", LOHA_TOKENS, loha_ops),
    _merged(
        "LOKR",
        "kron(w1, w2) * alpha/r on Linear, each factor full or a product (decompose_both, "
        "decompose_factor), rank_pattern/alpha_pattern",
        LOKR_TOKENS,
        lokr_ops,
    ),
    _merged(
        "OFT",
        "W R^T (Linear) or W R (Embedding), R block-diagonal from PEFT's Cayley(-Neumann) "
        "parametrisation with coft/eps, block_share",
        OFT_TOKENS,
        oft_ops,
    ),
    _merged(
        "BOFT",
        "(W M^T) * boft_s on Linear, M the butterfly product of block-diagonal Cayley rotations",
        BOFT_TOKENS,
        boft_ops,
    ),
    _merged(
        "VERA",
        "(lambda_b * B) (lambda_d * A) on Linear and Conv1D, the shared vera_A/vera_B from the file "
        "(save_projection) or regenerated from projection_prng_key with PEFT's generator",
        VERA_TOKENS,
        vera_ops,
        VERA_SHARED,
    ),
    _merged(
        "TRAINABLE_TOKENS",
        "rows token_indices of the embedding replaced by the trained rows (apply the same "
        "specs to a tied output embedding stored as its own tensor)",
        TOKENS_TOKENS,
        tokens_ops,
    ),
    _merged(
        "FOURIERFT",
        "Re(ifft2(sparse spectrum)) * scaling on Linear and Conv1D, entry locations drawn from random_loc_seed as PEFT "
        "draws them, n_frequency_pattern; PEFT's own ifft2 runs in float32, so it agrees to float32 rounding",
        FOURIERFT_TOKENS,
        fourierft_ops,
    ),
    _merged(
        "HRA",
        "W H on Linear, H the product of r Householder reflections I - 2 u u^T (orthonormalised first with apply_GS)",
        HRA_TOKENS,
        hra_ops,
    ),
    _merged(
        "VBLORA",
        "B A on Linear and Conv1D, each factor's sub-vectors a top-k softmax mixture of the shared vblora_vector_bank "
        "(full logits, or save_only_topk_weights)",
        VBLORA_TOKENS,
        vblora_ops,
        VBLORA_SHARED,
    ),
    _merged(
        "HIRA",
        "W + W * (B A) on Linear, Conv1D (fan_in_fan_out) and Embedding ((B A)^T): the low-rank product gates the "
        "base weight elementwise",
        HIRA_TOKENS,
        hira_ops,
    ),
    _merged(
        "DELORA",
        "B diag(lambda / r / (|A_i| |B^i|)) A on Linear, columns scaled by the base column norms saved in the adapter "
        "(rank_pattern, lambda_pattern)",
        DELORA_TOKENS,
        delora_ops,
    ),
    _merged(
        "PVERA",
        "VeRA's delta with the first r rows (the means) of its 2r-row A and lambda_d, projections saved or regenerated "
        "from projection_prng_key with PEFT's generator",
        PVERA_TOKENS,
        pvera_ops,
        PVERA_SHARED,
    ),
    _merged(
        "LN_TUNING",
        "the targeted layers' weight and bias replaced by the trained copies saved in the adapter",
        LN_TUNING_TOKENS,
        ln_tuning_ops,
    ),
    *(
        _refused(t, _PROMPT)
        for t in ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "CPT", "CARTRIDGE")
    ),
    _refused(
        "ADAPTION_PROMPT",
        "it adds learned prompts through new gated attention at run time and changes no "
        "weight of the base, so there is nothing to merge; load it with PEFT on top of the base model",
    ),
    _refused(
        "XLORA",
        "it mixes several LoRA adapters per token with a learned classifier, so the update depends on "
        "the input and no single merged weight reproduces it (PEFT cannot merge it either)",
    ),
    _refused(
        "POLY",
        "it routes each task through a learned mixture of LoRA skills at run time, so the update depends "
        "on the task id and PEFT has no merge for it",
    ),
    _refused(
        "SHADOW",
        "its adaptation is an input-dependent shadow network, not a weight delta, so PEFT itself cannot merge it",
    ),
    *(
        _refused(t, _NOT_YET)
        for t in (
            "ADAMSS",
            "BEFT",
            "LILY",
            "FROD",
            "GLORA",
            "UNILORA",
            "MISS",
            "BONE",
            "RANDLORA",
            "ROAD",
            "SHIRA",
            "C3A",
            "WAVEFT",
            "OSF",
            "GRALORA",
            "TINYLORA",
            "PSOFT",
            "PEANUT",
            "SUPERTUNING",
            "DEFT",
        )
    ),
)

REGISTRY: dict[str, PeftTypeRecord] = {r.peft_type: r for r in _RECORDS}


def record_for(peft_type: str) -> PeftTypeRecord:
    """The record of ``peft_type`` (case-insensitive); UnsupportedAdapterError if it is refused or unknown."""
    record = REGISTRY.get(str(peft_type).upper())
    if record is None:
        raise UnsupportedAdapterError(
            f"This adapter's peft_type {peft_type!r} is unknown to PEFT 0.21 and to this tool; "
            "check adapter_config.json."
        )
    if record.status != "merged":
        raise unsupported(record)
    return record


def peft_type_support() -> list[tuple[str, Status, str]]:
    """(peft_type, "merged" | "refused", reason) for every member of PEFT's own ``PeftType``, in its order."""
    from peft.utils import PeftType

    rows = []
    for member in PeftType:
        record = REGISTRY.get(member.value) or _refused(member.value, _NOT_YET)
        rows.append((member.value, record.status, record.reason))
    return rows
