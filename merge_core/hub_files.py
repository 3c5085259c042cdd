"""Which files of a Hub repo a merge needs: the adapter's, the base's small files, its weights."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from .errors import AdapterConfigError, BaseCheckpointError
from .hub_ids import RepoRef

# What a tokenizer may consist of: copied with the adapter or the base's small files.
_TOKENIZER_PATTERNS = [
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "*.model",
    "*.tiktoken",
]
ADAPTER_PATTERNS = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "README.md",
    *_TOKENIZER_PATTERNS,
]
BASE_SMALL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "README.md",
    *_TOKENIZER_PATTERNS,
    "*.py",
    "preprocessor_config.json",
]


def matching(files: Iterable[str], patterns: list[str]) -> list[str]:
    return [f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in patterns)]


def pickle_only(files: Iterable[str]) -> bool:
    names = set(files)
    has_safe = any(f.endswith(".safetensors") and "/" not in f and not f.startswith("adapter_") for f in names)
    has_pickle = any(f.startswith("pytorch_model") and f.endswith((".bin", ".bin.index.json")) for f in names)
    return has_pickle and not has_safe


def base_weight_files(files: dict[str, int], ref: RepoRef) -> list[str]:
    # model.safetensors first, as transformers (and huggingface_hub's header reads) pick it over an index beside it.
    if "model.safetensors" in files:
        return ["model.safetensors"]
    if "model.safetensors.index.json" in files:
        return []  # listed by the index, read after the small files arrive
    if pickle_only(files):
        raise BaseCheckpointError(
            f"{ref} only has pickle weights (pytorch_model*.bin). This tool streams safetensors and never executes "
            "pickles. Pick a revision with safetensors (Hub repos often have a 'Adding `safetensors` variant' pull "
            "request, e.g. revision refs/pr/1)."
        )
    raise BaseCheckpointError(
        f"{ref} has no model weights (model.safetensors or its index). Is it a transformers model repo?"
    )


def adapter_subfolders(files: Iterable[str]) -> list[str]:
    """The subfolders that hold an adapter of their own (PEFT's multi-adapter layout), sorted."""
    return sorted({f[: -len("/adapter_config.json")] for f in files if f.endswith("/adapter_config.json")})


def adapter_files(files: dict[str, int], ref: RepoRef, subfolder: str = "") -> list[str]:
    subfolder = subfolder or ref.subfolder
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    if f"{prefix}adapter_config.json" not in files:
        subdirs = adapter_subfolders(files)
        if subdirs:
            raise AdapterConfigError(
                f"{ref} keeps its adapters in subfolders ({', '.join(subdirs)}); pick one by adding it to the ID, "
                f"e.g. {ref.repo_id}/{subdirs[0]}."
            )
        if "config.json" in files:
            raise AdapterConfigError(
                f"{ref} is a full model, not a LoRA adapter (no adapter_config.json). Did you swap base and adapter?"
            )
        raise AdapterConfigError(f"{ref} has no adapter_config.json, so it is not a PEFT adapter repo.")
    if f"{prefix}adapter_model.safetensors" not in files and f"{prefix}adapter_model.bin" not in files:
        raise AdapterConfigError(f"{ref} has adapter_config.json but no adapter weights (adapter_model.safetensors).")
    local = {f[len(prefix) :]: f for f in files if f.startswith(prefix)}
    if "adapter_model.safetensors" in local:  # PEFT reads it; the pickle would be downloaded for nothing
        local.pop("adapter_model.bin", None)
    return [local[f] for f in matching(local, ADAPTER_PATTERNS)]
