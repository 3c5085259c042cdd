"""Sample generations: base alone, base + adapter (unmerged), and the merged model.

The base and base+adapter outputs come from one PeftModel (``disable_adapter`` gives the
base), so only two models are ever in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .models import GENERATIVE_TASKS, LoadedModels, load_models, pick_device

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


def render_prompt(tokenizer: Any, prompt: str, use_chat_template: bool = True) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


@torch.no_grad()
def generate_samples(models: LoadedModels, settings: GenerationSettings) -> SampleGeneration:
    if models.task not in GENERATIVE_TASKS:
        raise ValueError(
            f"This is a {models.task} model, which answers with labels or features, not generated text; "
            "the verification table compares its outputs instead."
        )
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
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    started = time.perf_counter()
    with models.peft.disable_adapter():
        base_text = run(models.peft)
    adapter_text = run(models.peft)
    merged_text = run(models.merged)
    return SampleGeneration(
        text, base_text, adapter_text, merged_text, str(models.device), time.perf_counter() - started, max_new
    )


__all__ = ["GenerationSettings", "LoadedModels", "SampleGeneration", "generate_samples", "load_models", "pick_device"]
