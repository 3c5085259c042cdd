"""Finding the base tensor an adapter module name refers to, and the embedding pair."""

from __future__ import annotations

from collections.abc import Collection

from .checkpoint import BaseCheckpoint

# Where checkpoints saved from a bare base model lack the task head's prefix, or the reverse.
_PREFIXES = ("model.", "transformer.", "gpt_neox.", "language_model.", "model.language_model.")
_INPUT_EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
    "model.decoder.embed_tokens.weight",
    "embed_tokens.weight",
    "wte.weight",
)
OUTPUT_EMBEDDING_NAME = "lm_head.weight"


def resolve_tensor(name: str, known: Collection[str], model_prefix: str | None = None) -> str | None:
    """The base tensor ``name`` refers to: itself, a suffix of it, or it under a known prefix (or under
    ``model_prefix``, the base class's base_model_prefix: a bare BertModel adapter on a BertForMaskedLM
    checkpoint names ``encoder.*`` what the checkpoint calls ``bert.encoder.*``)."""
    if name in known:
        return name
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        candidate = ".".join(parts[i:])
        if candidate in known:
            return candidate
    for prefix in (*_PREFIXES, *([f"{model_prefix}."] if model_prefix else [])):
        if prefix + name in known:
            return prefix + name
    return None


def base_model_prefix(config: dict) -> str | None:
    """transformers' ``base_model_prefix`` of the class config.json names: where a head class keeps the bare
    model (``bert``, ``roberta``, ``vit``), the prefix from_pretrained adds or strips between the two layouts."""
    import transformers

    for name in config.get("architectures") or []:
        prefix = getattr(getattr(transformers, str(name), None), "base_model_prefix", None)
        if isinstance(prefix, str) and prefix:
            return prefix
    return None


def input_embedding(base: BaseCheckpoint) -> str | None:
    for name in _INPUT_EMBEDDING_NAMES:
        if name in base.tensors:
            return name
    vocab = base.text_config().get("vocab_size")
    for name, t in base.tensors.items():
        if ("embed" in name or "wte" in name) and len(t.info.shape) == 2 and t.info.shape[0] == vocab:
            return name
    return None


def similar_tensors(module: str, known: Collection[str], limit: int = 3) -> list[str]:
    leaf = module.rsplit(".", 1)[-1]
    return sorted(n for n in known if n.rsplit(".", 2)[0].endswith(leaf))[:limit]
