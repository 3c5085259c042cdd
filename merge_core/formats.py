"""Adapters that are not PEFT adapters: recognised by their files, refused in one sentence.

Decided from file names and, where there is one, the config's keys, so the Hub path can
refuse before downloading any weights. Each answer names the format and what to use instead.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ForeignFormat:
    name: str
    advice: str

    def message(self, where: str) -> str:
        return f"{where} is {self.name}, not a PEFT adapter, so this tool cannot merge it; {self.advice}."


_DIFFUSERS = ForeignFormat(
    "a diffusers/kohya image-model LoRA (Stable Diffusion, FLUX)",
    "load it with diffusers' load_lora_weights and fuse_lora instead",
)
_MLX = ForeignFormat(
    "an mlx-lm adapter",
    "fuse it with `mlx_lm.fuse`, or convert it to PEFT format first",
)
_ADAPTER_TRANSFORMERS = ForeignFormat(
    "an AdapterHub (adapter-transformers) adapter",
    "merge it with the `adapters` library (model.merge_adapter) instead",
)
_GGUF = ForeignFormat(
    "a GGUF adapter for llama.cpp",
    "apply it with llama.cpp (--lora, or llama-export-lora), or merge the original PEFT adapter here",
)
_GGUF_FILES = ("*.gguf",)
_DIFFUSERS_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin", "*lora*.safetensors")
_ADAPTER_HUB_FILES = ("pytorch_adapter.bin", "head_config.json", "adapter_model.bin.index.json")


def _matches(files: set[str], patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(f, p) for f in files for p in patterns)


def foreign_by_config(config: dict[str, Any]) -> ForeignFormat | None:
    """An adapter_config.json written by another library (no peft_type, its own keys)."""
    if "peft_type" in config:
        return None
    if {"fine_tune_type", "lora_parameters"} & config.keys():
        return _MLX
    inner = config.get("config")
    if (isinstance(inner, dict) and "architecture" in inner) or str(config.get("version", "")).startswith("adapters"):
        return _ADAPTER_TRANSFORMERS
    return None


def foreign_by_files(files: Iterable[str]) -> ForeignFormat | None:
    """A folder or repo without adapter_config.json that holds another library's adapter files."""
    names = {f.rsplit("/", 1)[-1] for f in files}
    if "adapter_config.json" in names:
        return None
    if _matches(names, _GGUF_FILES):
        return _GGUF
    if "adapters.safetensors" in names:
        return _MLX
    if _matches(names, _ADAPTER_HUB_FILES):
        return _ADAPTER_TRANSFORMERS
    if _matches(names, _DIFFUSERS_FILES) and "config.json" not in names:
        return _DIFFUSERS
    return None


def foreign_by_keys(keys: Iterable[str]) -> ForeignFormat | None:
    """Weight names of kohya/diffusers LoRAs (lora_unet_*, lora_te_*, *.lora.down.weight, unet./transformer. keys)."""
    for key in keys:
        if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "unet.", "text_encoder.")):
            return _DIFFUSERS
        if ".lora.down." in key or ".lora_down." in key or (key.endswith(".alpha") and "lora" in key):
            return _DIFFUSERS
    return None


def refuse_foreign(folder: Path) -> None:
    """Raise UnsupportedAdapterError when ``folder`` holds another library's adapter."""
    from .errors import UnsupportedAdapterError

    try:
        files = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        config = _read_config(folder / "adapter_config.json")
    except OSError:
        return  # unreadable folders get their own, more precise message from the loader
    found = foreign_by_files(files) or (foreign_by_config(config) if config is not None else None)
    if found is None:
        found = foreign_by_keys(_weight_keys(folder, files))
    if found is not None:
        raise UnsupportedAdapterError(found.message(f"The adapter at {folder}"))


def _read_config(path: Path) -> dict[str, Any] | None:
    from .json_files import JsonFormatError, read_json_file

    if not path.is_file():
        return None
    try:
        data = read_json_file(path)
    except JsonFormatError:
        return None  # the loader reports a broken config itself
    return data if isinstance(data, dict) else None


def _weight_keys(folder: Path, files: list[str]) -> list[str]:
    """Tensor names of a lone safetensors file, from its header only."""
    from .safetensors_io import SafetensorsFormatError, read_header

    candidates = [f for f in files if f.endswith(".safetensors") and f != "adapter_model.safetensors"]
    if "adapter_model.safetensors" in files:
        candidates.insert(0, "adapter_model.safetensors")
    for name in candidates[:1]:
        try:
            return list(read_header(folder / name).tensors)
        except (OSError, SafetensorsFormatError):
            return []
    return []
