"""Host memory while loading base + adapter and a second copy onto a GPU: device_map="cuda" (what
merge_core.models.load_models does on a GPU) against loading on the CPU first and moving with .to("cuda").

    python benchmarks/gpu_direct_load.py make     # a random 0.95B Llama in bfloat16 + a LoRA, under /tmp/m
    python benchmarks/gpu_direct_load.py direct   # each mode in a fresh process: its own peak
    python benchmarks/gpu_direct_load.py host

Prints one JSON line per mode; peak_anon_gb_over_start is the anonymous (heap) memory above the process's
level after CUDA started, sampled every 5 ms. File-backed pages (the mmapped safetensors) are page cache.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

FOLDER = "/tmp/m"


def make() -> None:
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )
    torch.set_default_device("cuda")  # random init on the GPU: seconds instead of minutes
    model = LlamaForCausalLM(config).to(torch.bfloat16).cpu()
    torch.set_default_device("cpu")
    model.save_pretrained(FOLDER)
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(FOLDER + "a")


def rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("RssAnon", "RssFile")):
                out[line[3:7].lower()] = int(line.split()[1]) * 1024
    return out


def load(mode: str) -> None:
    peak = {"anon": 0, "file": 0}

    def watch() -> None:
        while True:
            now = rss()
            peak["anon"], peak["file"] = max(peak["anon"], now["anon"]), max(peak["file"], now["file"])
            time.sleep(0.005)

    torch.zeros(1, device="cuda")
    start = rss()
    threading.Thread(target=watch, daemon=True).start()
    started = time.time()
    placed = {"device_map": "cuda"} if mode == "direct" else {}
    base = LlamaForCausalLM.from_pretrained(FOLDER, dtype=torch.float32, **placed)
    peft = PeftModel.from_pretrained(base, FOLDER + "a").to("cuda").eval()
    merged = LlamaForCausalLM.from_pretrained(FOLDER, dtype=torch.float32, **placed).to("cuda").eval()
    torch.cuda.synchronize()
    time.sleep(0.05)
    peft.generate(torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=4, do_sample=False)
    print(
        json.dumps(
            {
                "mode": mode,
                "file_dtype": "bf16",
                "one_model_fp32_gb": round(sum(p.numel() * 4 for p in merged.parameters()) / 1e9, 2),
                "peak_anon_gb_over_start": round((peak["anon"] - start["anon"]) / 1e9, 2),
                "peak_file_gb": round(peak["file"] / 1e9, 2),
                "cuda_alloc_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
                "load_s": round(time.time() - started, 1),
                "peft_device": str(next(peft.parameters()).device),
            }
        )
    )


if __name__ == "__main__":
    make() if sys.argv[1] == "make" else load(sys.argv[1])
