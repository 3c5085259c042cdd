"""Which transformers architectures become which llama.cpp architecture, and the metadata each needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from merge_core.errors import GgufUnsupportedError


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers ``model_type`` is written as GGUF.

    ``permute_qk``: llama.cpp's Llama graph applies rope to interleaved pairs, so the q/k rows of
    Llama-family checkpoints are reordered (transformers undoes it when reading). ``norm_plus_one``:
    Gemma stores ``w`` and computes with ``1 + w``; llama.cpp stores ``1 + w``.
    """

    model_type: str
    gguf_arch: str
    permute_qk: bool = False
    norm_plus_one: bool = False


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "llama", permute_qk=True),
    # llama.cpp converts Mistral as its Llama architecture (sliding window not used by either reader)
    "mistral": ArchSpec("mistral", "llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2", "qwen2"),
    "qwen3": ArchSpec("qwen3", "qwen3"),
    "gemma2": ArchSpec("gemma2", "gemma2", norm_plus_one=True),
    "gemma3_text": ArchSpec("gemma3_text", "gemma3", norm_plus_one=True),
    "phi3": ArchSpec("phi3", "phi3"),
}


def supported_architectures() -> list[str]:
    """The transformers ``model_type`` values that can be exported to GGUF."""
    return sorted(ARCHS)


def arch_spec(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise GgufUnsupportedError(
            f"GGUF export does not support the architecture {model_type!r}; supported: "
            f"{', '.join(supported_architectures())}."
        )
    return ARCHS[model_type]


def check_exportable(config: Any, spec: ArchSpec) -> None:
    """Refuse what llama.cpp would compute differently from transformers."""
    if not spec.norm_plus_one:
        return
    # llama.cpp scales Gemma queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 27B shapes only
    scalar = getattr(config, "query_pre_attn_scalar", None)
    per_head = config.hidden_size // config.num_attention_heads
    is_27b = config.num_hidden_layers == {"gemma2": 46, "gemma3": 62}[spec.gguf_arch]
    if scalar is not None and scalar != head_dim(config) and not (is_27b and scalar == per_head):
        raise GgufUnsupportedError(
            f"GGUF export cannot keep query_pre_attn_scalar={scalar} of this {spec.model_type} model "
            f"(llama.cpp uses head_dim={head_dim(config)}); export only models where they agree."
        )
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
    if spec.gguf_arch == "gemma3" and local not in (None, 10000.0):
        raise GgufUnsupportedError(
            f"GGUF export cannot keep the sliding-layer rope base {local} (llama.cpp fixes it at 10000); "
            "export only Gemma 3 models with the standard base."
        )


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rows of each head regrouped from halves to interleaved pairs."""
    heads = n_head_kv if n_head_kv != n_head else n_head
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def head_dim(config: Any) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings as one dict (transformers v5 keeps them in ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params:  # Gemma 3: per layer type
        params = params["full_attention"]
    legacy = getattr(config, "rope_scaling", None) or {}
    merged = {**legacy, **params}
    if "rope_theta" not in merged and getattr(config, "rope_theta", None) is not None:
        merged["rope_theta"] = config.rope_theta
    return merged


def write_arch_metadata(writer: Any, config: Any, spec: ArchSpec) -> None:
    """The ``{arch}.*`` keys llama.cpp's converter writes for these architectures."""
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    # written for every architecture, as llama.cpp's converter does whenever config.json states head_dim
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    if spec.gguf_arch == "llama":
        writer.add_rope_dimension_count(head_dim(config))
        writer.add_vocab_size(int(config.vocab_size))
    if spec.gguf_arch == "phi3":
        rotary = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
        writer.add_rope_dimension_count(int(rotary * config.hidden_size) // config.num_attention_heads)
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
    if spec.gguf_arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(int(config.sliding_window))
    if spec.gguf_arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
