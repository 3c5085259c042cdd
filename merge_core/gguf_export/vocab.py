"""Tokenizer metadata for GGUF, read from the merged folder's tokenizer.json (the tokenizer as it really runs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_core.errors import GgufTokenizerError

# llama.cpp's names for the split rules; the regexes are transformers' own table, so both readers agree
_PREFERRED_PRE_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GgufVocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece-style BPE with byte fallback)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def read_vocab(merged_dir: Path, vocab_size: int) -> GgufVocab:
    """The vocabulary of ``merged_dir/tokenizer.json`` padded to the model's ``vocab_size``."""
    path = merged_dir / "tokenizer.json"
    if not path.is_file():
        raise GgufTokenizerError(f"GGUF export needs {path.name} in {merged_dir}; save the tokenizer with the model.")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GgufTokenizerError(
            f"GGUF export supports BPE tokenizers only, not {model.get('type')!r}; export from a BPE tokenizer."
        )
    sentencepiece_style = bool(model.get("byte_fallback"))
    tokens, types = _tokens_and_types(data, vocab_size, sentencepiece_style=sentencepiece_style)
    config = _tokenizer_config(merged_dir)
    add_bos, add_eos = _adds_special(path)
    vocab = GgufVocab(
        model="llama" if sentencepiece_style else "gpt2",
        pre="default" if sentencepiece_style else byte_level_pre_name(data.get("pre_tokenizer")),
        tokens=tokens,
        token_types=types,
        scores=[-float(i) if t == _NORMAL else 0.0 for i, t in enumerate(types)],
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        special_ids=_special_ids(config, tokens),
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=_adds_space_prefix(data) if sentencepiece_style else None,
        chat_template=_chat_template(merged_dir, config),
    )
    return vocab


def byte_level_pre_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name of the split rule this byte-level pre-tokenizer applies; refuses rules it has no name for."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre_tokenizer and pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        if not pre_tokenizer.get("add_prefix_space"):
            return "gpt-2"
    steps = (pre_tokenizer or {}).get("pretokenizers") or []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name in _PREFERRED_PRE_NAMES:
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == pattern and not steps[1].get("use_regex", True):
                return name
    raise GgufTokenizerError(
        "GGUF export does not know llama.cpp's name for this tokenizer's split rule; "
        f"supported: gpt-2, {', '.join(_PREFERRED_PRE_NAMES)}."
    )


def _tokens_and_types(data: dict[str, Any], vocab_size: int, *, sentencepiece_style: bool) -> tuple[list, list]:
    by_id: dict[int, tuple[str, int]] = {}
    unk = (data.get("model") or {}).get("unk_token")
    for token, index in (data["model"].get("vocab") or {}).items():
        kind = _NORMAL
        if sentencepiece_style and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = _BYTE
        elif token == unk:
            kind = _UNKNOWN
        by_id[index] = (token, kind)
    for added in data.get("added_tokens") or []:
        kind = _CONTROL if added.get("special") else _USER_DEFINED
        by_id[added["id"]] = (added["content"], _UNKNOWN if added["content"] == unk else kind)
    if by_id and max(by_id) >= vocab_size:
        raise GgufTokenizerError(
            f"The tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}; "
            "resize the embeddings or fix the tokenizer before exporting."
        )
    # llama.cpp pads a vocabulary shorter than the embedding matrix with unused "[PADn]" tokens
    pairs = [by_id.get(i, (f"[PAD{i}]", _UNUSED)) for i in range(vocab_size)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _tokenizer_config(merged_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json, with special_tokens_map.json (older saves) filling the token names it lacks."""
    merged: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = merged_dir / name
        if path.is_file():
            merged |= {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if v is not None}
    return merged


def _special_ids(config: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    ids = {}
    lookup = {token: i for i, token in enumerate(tokens)}
    for key in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{key}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in lookup:
            ids[key] = lookup[value]
    return ids


def _adds_special(path: Path) -> tuple[bool, bool]:
    """Whether encoding adds BOS/EOS, observed on the real tokenizer rather than read from flags."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    if not starts:
        return False, False
    return starts[0] > 0, starts[0] + len(plain) < len(full)


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return "Prepend" in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text


def _chat_template(merged_dir: Path, config: dict[str, Any]) -> str | None:
    jinja = merged_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    return template if isinstance(template, str) else None
