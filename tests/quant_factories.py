"""Quantized tiny bases built on the fly: real bitsandbytes checkpoints through transformers, FP8 by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from merge_core.safetensors_io import ST_FROM_DTYPE

# hidden and intermediate are multiples of 64, the bitsandbytes 4-bit block, like every real model.
HIDDEN, INTERMEDIATE, VOCAB = 64, 128, 96
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB, tie_word_embeddings=False,
    )  # fmt: skip


def make_float_base(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_llama_config()).to(dtype).save_pretrained(path)
    return path


def bnb_config(
    kind: str,
    *,
    double_quant: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
    skip: list[str] | None = None,
):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage,
                              llm_int8_skip_modules=skip)  # fmt: skip


def make_bnb_base(
    float_dir: Path, path: Path, kind: str, *, load_dtype: torch.dtype = torch.float32, **kwargs: Any
) -> Path:
    """A pre-quantized bitsandbytes checkpoint, written the way the Hub's -bnb-4bit repos are.

    ``load_dtype`` is the dtype the model is loaded in to be quantized (bfloat16 for most Hub repos):
    the unquantized weights keep it and the 4-bit quant states record it.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=bnb_config(kind, **kwargs),
                                                 device_map="cpu", dtype=load_dtype)  # fmt: skip
    model.save_pretrained(path)
    return path


def fp8_quantize(weight: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, float32 weight_scale_inv), per tensor or per block with ceil-sized edge blocks."""
    w = weight.to(torch.float32)
    if block is None:
        scale_inv = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
        return (w / scale_inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale_inv.reshape(())
    bm, bn = block
    rows, cols = w.shape
    grid = (math.ceil(rows / bm), math.ceil(cols / bn))
    scale_inv = torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            scale_inv[i, j] = (w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].abs().amax() / FP8_MAX).clamp(min=1e-12)
    full = scale_inv.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale_inv


def make_fp8_base(float_dir: Path, path: Path, *, block: tuple[int, int] | None) -> Path:
    """A FineGrainedFP8 checkpoint as DeepSeek/Qwen FP8 repos ship it: every decoder linear quantized."""
    from safetensors.torch import load_file, save_file

    state = load_file(float_dir / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if ".layers." in name and name.endswith("proj.weight"):
            out[name], out[name.removesuffix(".weight") + ".weight_scale_inv"] = fp8_quantize(value, block)
        else:
            out[name] = value
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block) if block else None}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def header_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)}, what a safetensors header says about these tensors."""
    return {name: (ST_FROM_DTYPE[t.dtype], tuple(t.shape)) for name, t in state.items()}


def dict_reader(state: dict[str, torch.Tensor]):
    """A RowReader over in-memory tensors that hands out copies, as reading a file would."""

    def read(name: str, start: int, stop: int | None) -> torch.Tensor:
        t = state[name]
        return t.clone() if t.dim() == 0 else t[start:stop].clone()

    return read


def bnb4_state(weight: torch.Tensor, name: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained writes for one bitsandbytes 4-bit weight, made with bitsandbytes itself."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, **kwargs)
    return {name: packed, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}}
