"""Sample generations: base alone, base + adapter (unmerged), and the merged model.

The base and base+adapter outputs come from one PeftModel (``disable_adapter`` gives the
base), so only two models are ever in memory.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .plan import MergePlan
from .safetensors_io import DTYPE_FROM_ST

# Keeps a CPU Space responsive: generation on 2 vCPUs is slow for anything but tiny models.
CPU_MAX_NEW_TOKENS = 64


@dataclass
class GenerationSettings:
    prompt: str
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    use_chat_template: bool = True


@dataclass
class SampleGeneration:
    prompt: str  # the text the models actually saw (chat template applied)
    base: str
    adapter: str
    merged: str
    device: str
    seconds: float
    max_new_tokens: int

    @property
    def merged_equals_adapter(self) -> bool:
        return self.merged == self.adapter


@dataclass
class LoadedModels:
    peft: Any  # PeftModel(base, adapter), unmerged
    merged: Any
    tokenizer: Any
    device: torch.device
    merged_dtype: torch.dtype
    base_vocab: int
    pad_token_id: int

    def release(self) -> None:
        self.peft = self.merged = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_models(plan: MergePlan, merged_dir: str | Path, *, device: str = "auto", dtype: torch.dtype = torch.float32) -> LoadedModels:
    """Load PeftModel(base, adapter) and the merged model side by side, in ``dtype``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    base = AutoModelForCausalLM.from_pretrained(plan.base.path, dtype=dtype)
    base_vocab = base.get_input_embeddings().weight.shape[0]
    merged_vocab = next((t.shape[0] for t in plan.tensors if t.adapter_key and t.name == _embed_name(plan)), None)
    if merged_vocab and merged_vocab != base_vocab:
        # The adapter was trained after resize_token_embeddings; PEFT needs the same shapes.
        base.resize_token_embeddings(merged_vocab, mean_resizing=False)
    peft_model = PeftModel.from_pretrained(base, plan.adapter.path).to(dev).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).to(dev).eval()
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    except Exception:  # noqa: BLE001 - a model without tokenizer still verifies on token ids
        tokenizer = None
    pad = None
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    merged_dtype = DTYPE_FROM_ST[plan.output_dtype]
    return LoadedModels(peft_model, merged, tokenizer, dev, merged_dtype, base_vocab, pad if pad is not None else 0)


def _embed_name(plan: MergePlan) -> Optional[str]:
    for t in plan.tensors:
        if t.name.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")):
            return t.name
    return None


def render_prompt(tokenizer: Any, prompt: str, use_chat_template: bool = True) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate_samples(models: LoadedModels, settings: GenerationSettings) -> SampleGeneration:
    if models.tokenizer is None:
        raise ValueError("The merged model has no tokenizer, so it cannot generate text from a prompt.")
    tok = models.tokenizer
    max_new = settings.max_new_tokens
    if models.device.type == "cpu":
        max_new = min(max_new, CPU_MAX_NEW_TOKENS)
    text = render_prompt(tok, settings.prompt, settings.use_chat_template)
    enc = tok(text, return_tensors="pt", add_special_tokens=not (settings.use_chat_template and tok.chat_template))
    enc = {k: v.to(models.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=models.pad_token_id)
    if settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False)

    def run(model: Any) -> str:
        # Same seed for each model, so sampled outputs differ only because the weights do.
        torch.manual_seed(settings.seed)
        out = model.generate(**enc, **kwargs)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    started = time.perf_counter()
    with models.peft.disable_adapter():
        base_text = run(models.peft)
    adapter_text = run(models.peft)
    merged_text = run(models.merged)
    return SampleGeneration(text, base_text, adapter_text, merged_text, str(models.device),
                            time.perf_counter() - started, max_new)
