"""Tiny random models with a real trained tokenizer, saved the way merge_core writes a merged folder."""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN = 64
# larger than transformers' 0.02 so attention shapes the logits (a wrong q/k order moves them by whole units)
INIT_STD = 0.2
LAYERS = 2
SPECIALS = ["<|begin|>", "<|end|>", "<|pad|>"]
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Numbers 1234567890 and 3.14159 appear here 42 times.",
    "def f(x):\n    return x ** 2  # code too",
    "Emoji 🤗🚀 and accents Ünïcödé, 日本語 text.",
    "don't I'll we've they're   spaced\tout\n\nlines",
] * 20

# the Llama 3 split rule, as Llama 3 tokenizer.json files spell it
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_tokenizer(vocab: int):
    """A byte-level BPE tokenizer (Llama 3 split rule) trained on CORPUS, with BOS added like Llama 3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - 4,  # leaves ids unused, as real models pad their embeddings
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    bos = tokenizer.token_to_id(SPECIALS[0])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", pair=f"{SPECIALS[0]} $A {SPECIALS[0]} $B", special_tokens=[(SPECIALS[0], bos)]
    )
    return tokenizer


def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer (BPE over "▁" pieces with byte fallback), as its tokenizer.json spells it.

    Built with the tokenizers library because sentencepiece and protobuf are not installed: the
    vocabulary starts with <unk>, <s>, </s> and the 256 <0xXX> byte pieces, like Llama 2's.
    """
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer_model.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    trained = json.loads(trainer_model.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def tiny_config(arch: str, *, vocab: int, tie: bool, layers: int = LAYERS, overrides: dict | None = None):
    from transformers import AutoConfig

    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        initializer_range=INIT_STD,
    )
    extra = {
        "qwen2": {},
        "qwen3": {"head_dim": 128},  # transformers' GGUF reader assumes Qwen3's default head_dim
        # Gemma's own head_dim (256): llama.cpp scales queries by it and transformers' reader assumes it
        "gemma2": {"head_dim": 256, "sliding_window": 64},
        "gemma3_text": {"head_dim": 256, "sliding_window": 64},
        "phi3": {},
    }.get(arch, {})
    return AutoConfig.for_model(arch, **common, **extra | (overrides or {}))


def make_merged_folder(
    path: Path,
    arch: str,
    *,
    tie: bool,
    vocab: int = 512,
    seed: int = 0,
    sentencepiece: bool = False,
    layers: int = LAYERS,
    overrides: dict | None = None,
) -> Path:
    """A random model of ``arch`` and its tokenizer, saved like a merged folder (float32 safetensors)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, vocab=vocab, tie=tie, layers=layers, overrides=overrides)
    ).to(torch.float32)
    with torch.no_grad():  # random norms, so a wrong norm convention shows in the logits
        centre = 0.0 if arch.startswith("gemma") else 1.0  # Gemma computes with 1 + w
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(centre, 0.3)
    model.save_pretrained(path)
    if sentencepiece:
        backend, names = (
            sentencepiece_style_tokenizer(),
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        )
    else:
        backend, names = (
            byte_level_tokenizer(vocab),
            dict(zip(("bos_token", "eos_token", "pad_token"), SPECIALS, strict=True)),
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    fast.chat_template = "{% for m in messages %}<|begin|>{{ m['content'] }}<|end|>{% endfor %}"
    fast.save_pretrained(path)
    return path
