#!/usr/bin/env python3
"""The baseline ("seed") merge path: plain transformers + PEFT, whole model in RAM.

Usage:
    python benchmarks/seed_merge.py BASE_DIR ADAPTER_DIR OUTPUT_DIR [--device cpu|cuda] [--max-shard-size 5GB]

This is what most people run, so it is what merge_core is compared against:
    AutoModelForCausalLM.from_pretrained(BASE, dtype=<base dtype>)
    PeftModel.from_pretrained(model, ADAPTER).merge_and_unload()
    save_pretrained(OUT, max_shard_size="5GB")   # safetensors
Phase timings are printed as `[seed] <phase> <seconds>s` lines for run.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_dtype(base: Path) -> torch.dtype:
    cfg = json.loads((base / "config.json").read_text())
    # transformers 5 writes "dtype"; checkpoints from 4.x have "torch_dtype".
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return _DTYPES[name]


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers >= 4.56 takes `dtype=`; `torch_dtype=` is deprecated (v5) and
    # absent in older releases' docs only, so pick by version.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def copy_tokenizer(base: Path, adapter: Path, out: Path) -> list[str]:
    """Copy tokenizer files, preferring the adapter's (training may add tokens)."""
    copied = []
    for name in TOKENIZER_FILES:
        for src_dir in (adapter, base):
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, out / name)
                copied.append(name)
                break
    return copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu", help="device_map for loading (cpu or cuda)")
    ap.add_argument("--max-shard-size", default="5GB")
    args = ap.parse_args()

    t0 = time.perf_counter()
    dtype = base_dtype(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, device_map=args.device, **dtype_kwarg(dtype))
    t1 = time.perf_counter()
    print(f"[seed] load_base {t1 - t0:.3f}s ({dtype})", flush=True)

    model = PeftModel.from_pretrained(model, str(args.adapter))
    t2 = time.perf_counter()
    print(f"[seed] load_adapter {t2 - t1:.3f}s", flush=True)

    merged = model.merge_and_unload()
    t3 = time.perf_counter()
    print(f"[seed] merge {t3 - t2:.3f}s", flush=True)

    # transformers 5 always writes safetensors (safe_serialization was removed);
    # only pass it where the argument still exists.
    kwargs = {"max_shard_size": args.max_shard_size}
    if int(transformers.__version__.split(".")[0]) < 5:
        kwargs["safe_serialization"] = True
    merged.save_pretrained(args.out, **kwargs)
    copied = copy_tokenizer(args.base, args.adapter, args.out)
    t4 = time.perf_counter()
    print(f"[seed] save {t4 - t3:.3f}s (tokenizer files copied: {copied or 'none'})", flush=True)
    print(f"[seed] total {t4 - t0:.3f}s", flush=True)


if __name__ == "__main__":
    main()
