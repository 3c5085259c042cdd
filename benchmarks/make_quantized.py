#!/usr/bin/env python3
"""Turn a float checkpoint (e.g. one from make_checkpoint.py) into a pre-quantized bitsandbytes 4-bit one.

Usage:
    python benchmarks/make_quantized.py SRC_DIR OUT_DIR [--quant-type nf4|fp4] [--no-double-quant]

Writes what transformers' save_pretrained writes for a BitsAndBytesConfig(load_in_4bit=True) model
(the `-bnb-4bit` repos on the Hub): every 2-D `*_proj.weight` of the decoder layers packed by
bitsandbytes' own quantize_4bit, its quant state as `weight.absmax`, `weight.quant_map`, ... (the
packed QuantState.as_dict), everything else copied, and `quantization_config` in config.json. One
shard at a time, so memory stays near the largest shard; no model is ever built.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and ".layers." in name and name.endswith("_proj.weight")


def quantize_shard(src: Path, dst: Path, *, quant_type: str, double_quant: bool) -> int:
    import bitsandbytes.functional as bnbf

    out: dict[str, torch.Tensor] = {}
    count = 0
    with safe_open(src, "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if not _quantized(name, tuple(tensor.shape)):
                out[name] = tensor
                continue
            packed, state = bnbf.quantize_4bit(
                tensor, blocksize=64, quant_type=quant_type, compress_statistics=double_quant, quant_storage=torch.uint8
            )
            out[name] = packed
            for key, value in state.as_dict(packed=True).items():
                out[f"{name}.{key}"] = value
            count += 1
    save_file(out, dst, metadata={"format": "pt"})
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--no-double-quant", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    began = time.perf_counter()
    config = json.loads((args.src / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": args.quant_type,
        "bnb_4bit_use_double_quant": not args.no_double_quant,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards = sorted(args.src.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        total += quantize_shard(
            shard, args.out / shard.name, quant_type=args.quant_type, double_quant=not args.no_double_quant
        )
        with safe_open(args.out / shard.name, "pt") as f:
            weight_map.update({k: shard.name for k in f.keys()})
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (args.src / extra).is_file():
            shutil.copyfile(args.src / extra, args.out / extra)
    print(
        f"{total} weights quantized ({args.quant_type}, double quant {not args.no_double_quant}) in "
        f"{time.perf_counter() - began:.1f}s -> {args.out}"
    )


if __name__ == "__main__":
    main()
