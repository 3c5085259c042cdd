"""The "requantized" target: a plain merged model written back as a bitsandbytes checkpoint.

transformers does the work (load with a BitsAndBytesConfig on CPU, save_pretrained), so the result
is exactly what a user would get quantizing the merged model themselves, and loads the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedQuantizationError
from ..model_lock import building_models
from .types import QuantizedBase, QuantKind

# transformers' Linear4bit always quantizes in blocks of 64; another blocksize cannot be reproduced.
TRANSFORMERS_4BIT_BLOCKSIZE = 64
# What save_pretrained writes itself; every other small file of the merged folder (tokenizer, chat
# template, processor) is copied so the requantized folder is as complete as the merged one.
_WRITTEN_BY_SAVE = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def bnb_settings(qbase: QuantizedBase) -> dict[str, Any]:
    """The BitsAndBytesConfig fields that reproduce the base's quantization (from its config, else its tensors)."""
    kinds = set(qbase.kinds())
    if not kinds or kinds - {QuantKind.BNB_4BIT, QuantKind.BNB_8BIT} or len(kinds) > 1:
        raise UnsupportedQuantizationError(
            f"The base is not a bitsandbytes checkpoint ({qbase.method}), so there are no bitsandbytes settings to "
            "requantize with; choose the dequantized target instead."
        )
    settings = {k: v for k, v in qbase.quantization_config.items() if not k.startswith("_") and k != "quant_method"}
    if kinds == {QuantKind.BNB_8BIT}:
        settings.update(load_in_8bit=True, load_in_4bit=False)
        return settings
    states = [t.bnb4 for t in qbase.tensors.values()]
    if any(s is None for s in states):
        raise ValueError("resolve_shapes must run before bnb_settings: the 4-bit states are not read yet")
    blocksizes = {s.blocksize for s in states if s is not None}
    if blocksizes != {TRANSFORMERS_4BIT_BLOCKSIZE}:
        raise UnsupportedQuantizationError(
            f"The base uses 4-bit blocks of {sorted(blocksizes)} values but transformers only writes blocks of "
            f"{TRANSFORMERS_4BIT_BLOCKSIZE}, so the requantized model would not match it; choose the dequantized "
            "target."
        )
    first = next(t for t in qbase.tensors.values() if t.bnb4 is not None)
    settings.update(load_in_4bit=True, load_in_8bit=False)
    settings.setdefault("bnb_4bit_quant_type", first.quant_type)
    settings.setdefault("bnb_4bit_use_double_quant", first.bnb4.nested)
    settings.setdefault("bnb_4bit_compute_dtype", str(qbase.default_dtype).removeprefix("torch."))
    return settings


def requantize(merged_dir: str | Path, out_dir: str | Path, *, settings: dict[str, Any]) -> Path:
    """Write the plain model in ``merged_dir`` as a bitsandbytes checkpoint in ``out_dir`` (created).

    Args:
        merged_dir: a plain (dequantized) merged model folder.
        out_dir: where the quantized checkpoint goes; must not exist yet.
        settings: BitsAndBytesConfig fields, e.g. from ``bnb_settings(qbase)``.

    Memory: transformers quantizes tensor by tensor while loading, so the peak is about the
    quantized model plus the largest unquantized tensor.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    config = BitsAndBytesConfig.from_dict(dict(settings))
    with building_models():
        model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=config, device_map="cpu",
                                                     dtype="auto")  # fmt: skip
    with torch.no_grad():
        model.save_pretrained(out_dir)
    del model
    for src in merged_dir.iterdir():
        if src.is_file() and src.name not in _WRITTEN_BY_SAVE and not src.name.endswith(_WEIGHT_SUFFIXES):
            if not (out_dir / src.name).exists():
                shutil.copy2(src, out_dir / src.name)
    return out_dir
