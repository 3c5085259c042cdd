"""Tiny models with non-trivial PEFT adapters of every merged type, and PEFT's own float64 merge as reference."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from merge_core.peft_types import ModuleInput, apply_all_, load_ops, plan_adapter

BLOCK_SIZES = (1, 3, 7, 10_000)


def llama_config(**overrides: Any):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=16)


# The layers both tiny mixture-of-experts bases share; each adds its own expert layout.
_TINY_MOE = dict(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def gpt_oss_config():
    from transformers import GptOssConfig

    return GptOssConfig(
        **_TINY_MOE, num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"]
    )


def moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_TINY_MOE, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2, head_dim=8)


@dataclass
class Case:
    """An adapter on disk, the float64 base weights, and PEFT's float64 merge of the two."""

    folder: Path
    config_raw: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    merged: dict[str, torch.Tensor]
    conv1d: bool
    experts_transposed: bool = False  # gpt-oss keeps its fused experts (experts, in, out): is_transposed

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.adapter.items()}


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial adapter values: PEFT initialises most types to the identity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
            if any(t in name for t in ("ia3_l", "boft_s", "vera_lambda", "lora_E", "lora_diag")):
                p.copy_(1.0 + 0.3 * noise)
            elif "trainable_tokens_delta" in name:
                p.copy_(noise)
            else:
                p.copy_(0.2 * noise)


def build_case(
    folder: Path,
    model_config,
    peft_config,
    *,
    seed: int = 0,
    edit: Callable[[Any], None] | None = None,
    reference_dtype: torch.dtype = torch.float64,
) -> Case:
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(model_config)
    with torch.no_grad():  # biases start at zero, which would hide a wrong bias update
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, peft_config)
        _randomize(peft_model, torch.Generator().manual_seed(seed + 1))
        if edit is not None:
            edit(peft_model)
        peft_model.save_pretrained(folder)
        fresh = AutoModelForCausalLM.from_config(model_config)
        fresh.load_state_dict(base_state, strict=False)
        fresh.to(reference_dtype)  # PiSSA and OLoRA re-initialise on load, which PEFT refuses in float64
        reference = PeftModel.from_pretrained(fresh, folder).to(reference_dtype)
        merged = reference.merge_and_unload().state_dict()
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        adapter = {k: f.get_tensor(k) for k in f.keys()}
    return Case(
        folder,
        json.loads((folder / "adapter_config.json").read_text()),
        adapter,
        {k: v.double() for k, v in base_state.items()},
        {k: v.detach().double() for k, v in merged.items()},
        conv1d=model_config.model_type == "gpt2",
        experts_transposed=model_config.model_type == "gpt_oss",
    )


def resolver(case: Case) -> Callable[[str, dict[str, str]], ModuleInput]:
    def resolve(module: str, keys: dict[str, str]) -> ModuleInput:
        params = {
            k[len(module) + 1 :]: tuple(v.shape)
            for k, v in case.base.items()
            if k.startswith(module + ".") and "." not in k[len(module) + 1 :]
        }
        weight = case.base.get(module + ".weight")
        embedding = module.endswith(("wte", "wpe", "embed_tokens", "lm_head"))
        return ModuleInput(
            module,
            keys,
            tuple(weight.shape) if weight is not None else (),
            stored_transposed=(case.conv1d and not embedding) or (weight is None and case.experts_transposed),
            has_bias=module + ".bias" in case.base,
            params={} if weight is not None else params,
        )

    return resolve


def streamed(case: Case, *, tied: dict[str, str] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """{block size: {tensor name: merged float64 value}} for the tensors the specs change."""
    per_module = plan_adapter(case.config_raw, case.shapes, resolver(case))
    targets: dict[str, list] = {}
    for module, specs in per_module.items():
        for spec in specs:
            targets.setdefault(f"{module}.{spec.tensor}", []).append(spec)
    for name, source in (tied or {}).items():
        targets[name] = targets[source]
    results: dict[int, dict[str, torch.Tensor]] = {}
    for step in BLOCK_SIZES:
        out = {}
        for name, specs in targets.items():
            base = case.base[name]
            ops = load_ops(specs, case.adapter.__getitem__, dtype=torch.float64, read_base=lambda b=base: b)
            value = base.clone()
            for a in range(0, base.shape[0], step):
                block = value[a : a + step].clone()
                value[a : a + step] = apply_all_(block, a, ops)
            out[name] = value
        results[step] = out
    return results


def max_relative_error(case: Case, results: dict[int, dict[str, torch.Tensor]]) -> float:
    """Largest |streamed - PEFT| / max(1, |PEFT|) over every tensor; untouched tensors must equal the base."""
    worst = 0.0
    for _step, tensors in results.items():
        for name, ref in case.merged.items():
            mine = tensors.get(name, case.base[name])
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            worst = max(worst, float((mine - ref).abs().max()) / scale if ref.numel() else 0.0)
    return worst
