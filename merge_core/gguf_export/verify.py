"""Verification rows for a GGUF file: read back by transformers and compared with the merged folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merge_core.gguf_export.export import GGUF_TYPES
from merge_core.model_lock import building_models
from merge_core.verify_report import Check

# Largest |logit difference| allowed, as a share of the merged model's largest |logit| (so one table serves
# models of any logit scale). Measured on the tiny random models of tests/test_gguf.py (hidden 64, 2 layers,
# weights of std 0.2, 8 positions, all seven architectures), the largest share seen was: F16 0.28 %,
# BF16 1.4 %, Q8_0 7.0 % (Qwen2); a Llama file with q/k rows left unpermuted is off by about 95 %.
# F32 is exact: the same float32 numbers reach the same float32 graph (Gemma's stored 1 + w included,
# since transformers computes 1 + (stored - 1), which rounds back to the stored value).
LOGIT_THRESHOLDS: dict[str, float] = {"F32": 0.0, "F16": 0.01, "BF16": 0.04, "Q8_0": 0.15}

# Emoji, digits (split rules differ on them), runs of whitespace, newlines, accents, code, and special tokens
TOKEN_PROBES: tuple[str, ...] = (
    "Hello world",
    "1234567890 and 3.14159, 1,000,000",
    "  two spaces,\tand a tab\n\nnew lines   ",
    "Emoji: 🤗🚀👍🏽 and ZWJ 👩‍💻",
    "Ünïcödé, 日本語, Ελληνικά, עברית",
    "def f(x):\n    return x ** 2  # comment",
    "don't I'll we've THEY'RE",
    "",
)
PROBE_IDS_LENGTH = 8


def verify_gguf(merged_dir: Path, gguf_file: Path, *, qtype: str, logits_skipped: str = "") -> list[Check]:
    """Metadata, token-id and logit rows for ``gguf_file`` against the merged folder it was exported from.

    ``logits_skipped``: the reason the logits row cannot run (two float32 copies do not fit), if so.
    """
    merged_dir, gguf_file = Path(merged_dir), Path(gguf_file)
    name = f"gguf logits ({qtype})"
    logits = (
        Check(name, "function", None, "-", "-", f"skipped: {logits_skipped}")
        if logits_skipped
        else _guarded(name, "function", lambda: _logits_row(merged_dir, gguf_file, qtype))
    )
    return [
        _guarded("gguf metadata", "structure", lambda: _metadata_row(merged_dir, gguf_file, qtype)),
        _guarded("gguf token ids", "function", lambda: _token_row(merged_dir, gguf_file)),
        logits,
    ]


def _guarded(name: str, group: str, row: Callable[[], Check]) -> Check:
    """The row, or a FAIL that says in one line why it could not run (never transformers' whole message)."""
    try:
        return row()
    except ImportError as exc:
        return Check(name, group, None, "-", "-", f"skipped: {exc.name or 'a package'} is not installed")
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes a short row, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0][:140]
        return Check(name, group, False, "-", "-", f"could not read the GGUF back ({type(exc).__name__}: {first})")


def _metadata_row(merged_dir: Path, gguf_file: Path, qtype: str) -> Check:
    from gguf import GGUFReader
    from transformers import AutoConfig

    from merge_core.gguf_export.arch import arch_spec
    from merge_core.gguf_export.rope import rope_type

    config = AutoConfig.from_pretrained(merged_dir)
    spec = arch_spec(config)
    reader = GGUFReader(gguf_file)
    arch = _field(reader, "general.architecture")
    context = _field(reader, f"{arch}.context_length")
    tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    expected = _expected_tensor_count(merged_dir, config) + (rope_type(config) == "llama3")
    found = {
        "architecture": arch,
        "tensors": len(reader.tensors),
        "context": context,
        "vocab": tokens,
        "file type": _field(reader, "general.file_type"),
    }
    want = {
        "architecture": spec.gguf_arch,
        "tensors": expected,
        "context": config.max_position_embeddings,
        "vocab": config.vocab_size,
        "file type": GGUF_TYPES[qtype][1],
    }
    wrong = [f"{k} {found[k]} != {want[k]}" for k in want if found[k] != want[k]]
    value = f"{arch}, {len(reader.tensors)} tensors, context {context}, vocab {tokens}"
    return Check("gguf metadata", "structure", not wrong, value, "equal to the merged config", "; ".join(wrong))


def _field(reader: Any, key: str) -> Any:
    field = reader.fields[key]
    return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]].tolist()


def _expected_tensor_count(merged_dir: Path, config: Any) -> int:
    from safetensors import safe_open

    names: set[str] = set()
    for shard in merged_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names.update(f.keys())
    names = {n for n in names if not n.endswith("rotary_emb.inv_freq")}
    if getattr(config, "tie_word_embeddings", False):
        names.discard("lm_head.weight")
    return len(names)


def _token_row(merged_dir: Path, gguf_file: Path) -> Check:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    reference = Tokenizer.from_file(str(merged_dir / "tokenizer.json"))
    from_gguf = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    probes = list(TOKEN_PROBES) + _special_probes(merged_dir)
    differ = [p for p in probes if reference.encode(p).ids != from_gguf(p)["input_ids"]]
    value = f"{len(probes) - len(differ)}/{len(probes)} strings identical"
    detail = f"first differing: {differ[0]!r}" if differ else ""
    return Check("gguf token ids", "function", not differ, value, "all identical", detail)


def _special_probes(merged_dir: Path) -> list[str]:
    data = json.loads((merged_dir / "tokenizer.json").read_text(encoding="utf-8"))
    specials = [t["content"] for t in data.get("added_tokens") or [] if t.get("special")][:4]
    return [f"{s}Hi{s} 42" for s in specials]


# Settings transformers 5.24's GGUF reader does not read back: it takes its config class's default instead
_READER_DEFAULTS = {
    "qwen3": {"head_dim": 128},
    "gemma2": {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {"query_pre_attn_scalar": 256},
}


def _reader_blind_spot(config: Any) -> str | None:
    """Why transformers cannot rebuild this model from the GGUF alone, or None."""
    from merge_core.gguf_export.rope import rope_type

    if rope_type(config) != "default":
        return "ignores rope scaling"
    for key, default in _READER_DEFAULTS.get(config.model_type, {}).items():
        if getattr(config, key, default) != default:
            return f"assumes {key}={default} (this model has {getattr(config, key)})"
    return None


def _logits_row(merged_dir: Path, gguf_file: Path, qtype: str) -> Check:
    import torch
    from transformers import AutoModelForCausalLM

    name = f"gguf logits ({qtype})"
    with building_models():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    if blind_spot := _reader_blind_spot(merged.config):
        return Check(name, "function", None, "-", "-", f"skipped: transformers' GGUF reader {blind_spot}")
    threshold = LOGIT_THRESHOLDS[qtype]
    with building_models():
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        ).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, merged.config.vocab_size, (1, PROBE_IDS_LENGTH), generator=generator)
    with torch.no_grad():
        reference = merged(ids).logits
        diff = (reference - gguf_model(ids).logits).abs().max().item()
    share = diff / max(reference.abs().max().item(), 1e-30)
    value = f"{share:.3%} (max |diff| {diff:.3g})"
    return Check(name, "function", share <= threshold, value, f"<= {threshold:.0%}", "of the largest |logit|")
