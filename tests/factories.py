"""Tiny models and adapters built on the fly: the tests never download anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 96
HIDDEN = 32
LAYERS = 2
INTERMEDIATE = 48


def tiny_config(
    arch: str,
    *,
    vocab: int = VOCAB,
    tie: bool | None = None,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
    intermediate: int = INTERMEDIATE,
):
    """A transformers config of ``arch`` at test size (4 attention heads, 2 key/value heads)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if arch == "gpt2":
        inner = None if intermediate == INTERMEDIATE else intermediate  # GPT-2's own default: 4 x hidden
        return GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_inner=inner,
            n_positions=64,
            vocab_size=vocab,
            tie_word_embeddings=True if tie is None else tie,
        )
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ValueError(arch)
    tie_default = arch == "qwen2"  # as the real families ship: Qwen2 small models tie, Llama/Mistral do not
    return classes[arch](
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=vocab,
        tie_word_embeddings=tie_default if tie is None else tie,
    )


def make_base(
    path: Path,
    arch: str = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    tie: bool | None = None,
    vocab: int = VOCAB,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
    intermediate: int = INTERMEDIATE,
) -> Path:
    """A randomly initialised tiny model of ``arch`` saved with transformers (the default shape unless asked)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab=vocab, tie=tie, hidden=hidden, layers=layers, intermediate=intermediate)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def make_adapter(
    base_dir: Path,
    path: Path,
    *,
    seed: int = 1,
    resize_vocab: int | None = None,
    magnitude_noise: float = 0.0,
    dtype: torch.dtype | None = None,
    **lora_kwargs: Any,
) -> Path:
    """A LoRA adapter with non-zero B (init_lora_weights=False), saved with PEFT."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base_dir)
    torch.manual_seed(seed)
    if resize_vocab:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault(
        "target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    config = LoraConfig(init_lora_weights=False, base_model_name_or_path=str(base_dir), **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                # Large enough that a wrong scale or a missed module shows in the logits.
                p.normal_(0, 0.2)
            elif "lora_magnitude_vector" in name and magnitude_noise:
                p.mul_(1 + magnitude_noise * torch.randn_like(p))
            elif "modules_to_save" in name or "trainable" in name:
                p.add_(0.05 * torch.randn_like(p))
    if dtype is not None:
        peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(path)
    return path


def prompt_ids(vocab: int = VOCAB, batch: int = 2, length: int = 12, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def peft_reference(
    base_dir: Path, adapter_dir: Path, *, resize_vocab: int | None = None, dtype: torch.dtype = torch.float32
):
    """PeftModel(base, adapter), unmerged: the ground truth a merge must reproduce."""
    from peft import PeftModel

    model = load_model(base_dir, dtype)
    if resize_vocab:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int = 8) -> torch.Tensor:
    out = model.generate(
        input_ids=ids[:1],
        max_new_tokens=new_tokens,
        do_sample=False,
        attention_mask=torch.ones_like(ids[:1]),
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :]


def make_tokenizer(path: Path, vocab: int = VOCAB) -> Path:
    """A word-level tokenizer over made-up words, with a chat template; no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return path
