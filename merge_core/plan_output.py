"""What the merged folder holds besides the merged tensors: shards, config.json, small files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .errors import AdapterWeightsError
from .options import dtype_name
from .plan_types import OutputTensorPlan
from .tensor_names import OUTPUT_EMBEDDING_NAME

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Small files a merged model needs besides weights; weights, indexes and cards are ours to write.
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "README.md", ".gitattributes"}
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")


def shard(tensors: list[OutputTensorPlan], limit: int) -> list[list[OutputTensorPlan]]:
    """Consecutive tensors per shard, a new shard whenever the next tensor would pass ``limit``."""
    shards: list[list[OutputTensorPlan]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.planned().nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def check_vocab(plans: dict[str, OutputTensorPlan], embed: str | None) -> None:
    """Both sides of a resized vocabulary must come with the adapter."""
    head = plans.get(OUTPUT_EMBEDDING_NAME)
    if embed is None or head is None or embed not in plans:
        return
    if plans[embed].shape[0] != head.shape[0]:
        raise AdapterWeightsError(
            f"The adapter resized the vocabulary but ships only one side of it: {embed} has "
            f"{plans[embed].shape[0]} rows and {OUTPUT_EMBEDDING_NAME} has {head.shape[0]}. The rows of the new "
            "tokens on the other side are not in the adapter; save it with both embed_tokens and lm_head in "
            "modules_to_save."
        )


def output_config(
    base_config: dict[str, Any], *, vocab_delta: int, out_dtype: str, untie: bool, notes: list[str]
) -> dict[str, Any]:
    """The base's config.json with the output dtype, the adapter's vocabulary and the tying decided."""
    config = copy.deepcopy(base_config)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype_name(out_dtype)
    targets = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    if vocab_delta:
        for cfg in targets:
            if isinstance(cfg.get("vocab_size"), int):
                vocab = cfg["vocab_size"] + vocab_delta
                notes.append(f"vocab_size {cfg['vocab_size']} -> {vocab} to match the adapter's embeddings.")
                cfg["vocab_size"] = vocab
    if untie:
        for cfg in targets:
            cfg["tie_word_embeddings"] = False
    return config


def files_to_copy(base_dir: Path, adapter_dir: Path, notes: list[str]) -> dict[str, Path]:
    """Small files of the base (and the adapter's tokenizer, which wins when it ships one)."""
    files: dict[str, Path] = {}
    adapter_has_tokenizer = any((adapter_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    for path in sorted(base_dir.iterdir()):
        if not path.is_file() or path.name in _SKIP_FILES or not path.name.endswith(_COPY_SUFFIXES):
            continue
        if path.name.startswith(("adapter_", "pytorch_model")) or path.name.endswith(".index.json"):
            continue
        if adapter_has_tokenizer and path.name in TOKENIZER_FILES:
            continue
        files[path.name] = path
    if adapter_has_tokenizer:
        notes.append("Tokenizer files come from the adapter (it ships its own tokenizer).")
        for name in TOKENIZER_FILES:
            if (adapter_dir / name).is_file():
                files[name] = adapter_dir / name
    return files
