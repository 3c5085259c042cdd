"""Write a merged model folder as one GGUF file, one tensor in memory at a time."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merge_core.errors import GgufError, GgufUnsupportedError, explain_os_error
from merge_core.gguf_export.arch import ArchSpec, arch_spec, check_exportable, permute_qk, write_arch_metadata
from merge_core.gguf_export.rope import check_rope, rope_extra_tensors
from merge_core.gguf_export.vocab import GgufVocab, read_vocab
from merge_core.progress import ProgressCallback, ProgressUpdate, no_progress

# name -> (ggml type of 2-D tensors, llama.cpp's general.file_type)
GGUF_TYPES: dict[str, tuple[str, int]] = {
    "F32": ("F32", 0),
    "F16": ("F16", 1),
    "BF16": ("BF16", 32),
    "Q8_0": ("Q8_0", 7),
}


@dataclass
class GgufReport:
    path: Path
    qtype: str
    architecture: str  # llama.cpp's architecture name
    model_type: str  # transformers' model_type
    tensor_count: int
    bytes_written: int
    seconds: float
    context_length: int
    vocab_size: int
    pre_tokenizer: str


@dataclass(frozen=True)
class _Planned:
    gguf_name: str
    source: str | None  # tensor name in the shards; None for a generated tensor
    shape: tuple[int, ...]
    ggml_type: Any  # gguf.GGMLQuantizationType


def preflight_gguf(config: Any, qtypes: Sequence[str]) -> None:
    """Refuse, before any merging, what export_gguf would refuse for this transformers config.

    The tokenizer is checked only by export_gguf itself (it reads the merged folder's tokenizer.json).
    """
    for qtype in qtypes:
        if qtype not in GGUF_TYPES:
            raise GgufUnsupportedError(f"GGUF type {qtype!r} is not supported; choose one of {', '.join(GGUF_TYPES)}.")
    spec = arch_spec(config)
    check_exportable(config, spec)
    check_rope(config, spec)


def export_gguf(
    merged_dir: Path, out_file: Path, *, qtype: str, progress: ProgressCallback | None = None
) -> GgufReport:
    """Write ``merged_dir`` (safetensors shards, config.json, tokenizer files) as ``out_file`` in GGUF.

    Args:
        merged_dir: a folder as merge_core writes it.
        out_file: the .gguf path; written next to itself under a temporary name and renamed when complete.
        qtype: one of ``GGUF_TYPES`` (F32, F16, BF16, Q8_0).
        progress: receives one update per tensor written (stage "gguf", unit "B").
    Returns:
        A GgufReport with the architecture, tensor count and bytes written.
    """
    import gguf
    from transformers import AutoConfig

    progress = progress or no_progress
    started = time.monotonic()
    merged_dir, out_file = Path(merged_dir), Path(out_file)
    if not (merged_dir / "config.json").is_file():
        raise GgufError(f"No config.json in {merged_dir}; export a merged model folder.")
    config = AutoConfig.from_pretrained(merged_dir)
    preflight_gguf(config, [qtype])
    spec = arch_spec(config)
    vocab = read_vocab(merged_dir, int(config.vocab_size))
    writer = gguf.GGUFWriter(path=None, arch=spec.gguf_arch)
    _write_general(writer, merged_dir, qtype)
    write_arch_metadata(writer, config, spec)
    extra = rope_extra_tensors(writer, config, spec)
    _write_vocab(writer, vocab)
    sources = _shard_index(merged_dir)
    plan = _plan_tensors(config, spec, sources, extra, qtype)
    partial = out_file.with_name(out_file.name + ".partial")
    try:
        _stream(writer, plan, partial, lambda p: _tensor_bytes(p, sources, extra, config, spec), progress)
        os.replace(partial, out_file)
    except OSError as exc:
        _discard(writer, partial)
        raise GgufError(explain_os_error(exc, "write", out_file)) from exc
    except BaseException:
        _discard(writer, partial)
        raise
    return GgufReport(
        path=out_file,
        qtype=qtype,
        architecture=spec.gguf_arch,
        model_type=spec.model_type,
        tensor_count=len(plan),
        bytes_written=out_file.stat().st_size,
        seconds=time.monotonic() - started,
        context_length=int(config.max_position_embeddings),
        vocab_size=int(config.vocab_size),
        pre_tokenizer=vocab.pre,
    )


def _stream(writer: Any, plan: list, partial: Path, tensor_bytes: Any, progress: ProgressCallback) -> None:
    """Header, metadata and tensor infos first, then each tensor's data read only when its turn comes."""
    total = sum(_nbytes(p) for p in plan)
    for p in plan:
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), _nbytes(p), raw_dtype=p.ggml_type)
    writer.write_header_to_file(path=partial)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    done = 0
    for p in plan:
        data = tensor_bytes(p)
        writer.write_tensor_data(data)
        done += data.nbytes
        del data  # before the next tensor is read: one tensor in memory at a time
        progress(ProgressUpdate("gguf", done, total, "B", p.gguf_name))
    writer.close()


def _discard(writer: Any, partial: Path) -> None:
    writer.close()
    partial.unlink(missing_ok=True)


def _write_general(writer: Any, merged_dir: Path, qtype: str) -> None:
    import gguf

    # transformers 5.24 re-labels a Llama file named exactly "mistral" and then fails to read it
    name = merged_dir.resolve().name or "model"
    writer.add_name(name if name != "mistral" else "mistral-merged")
    writer.add_file_type(GGUF_TYPES[qtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer: Any, vocab: GgufVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _shard_index(merged_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (shard, shape), from the headers only."""
    from safetensors import safe_open

    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({merged_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        shards = sorted(merged_dir.glob("*.safetensors"))
    if not shards:
        raise GgufError(f"No safetensors weights in {merged_dir}; export a merged model folder.")
    names: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                names[key] = (shard, tuple(f.get_slice(key).get_shape()))
    return names


def _plan_tensors(config: Any, spec: ArchSpec, sources: dict, extra: dict[str, np.ndarray], qtype: str) -> list:
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = [_Planned(name, None, arr.shape, gguf.GGMLQuantizationType.F32) for name, arr in extra.items()]
    for source, (_, shape) in sources.items():
        if source.endswith("rotary_emb.inv_freq") or (tied and source == "lm_head.weight"):
            continue
        found = name_map.get_type_and_name(source, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in gguf.MODEL_TENSORS[arch]:
            raise GgufUnsupportedError(
                f"GGUF export has no {spec.gguf_arch} tensor for {source!r}; this checkpoint layout is not supported."
            )
        plan.append(_Planned(found[1], source, shape, _ggml_type(shape, qtype)))
    return plan


def _ggml_type(shape: tuple[int, ...], qtype: str) -> Any:
    """llama.cpp's rule: vectors stay F32; rows Q8_0 cannot block fall back to F16."""
    import gguf

    if len(shape) <= 1:
        return gguf.GGMLQuantizationType.F32
    ggml = gguf.GGMLQuantizationType[GGUF_TYPES[qtype][0]]
    block = gguf.GGML_QUANT_SIZES[ggml][0]
    return ggml if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(p: _Planned) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[p.ggml_type]
    return int(np.prod(p.shape[:-1], dtype=np.int64)) * (p.shape[-1] // block) * type_size


def _tensor_bytes(p: _Planned, sources: dict, extra: dict, config: Any, spec: ArchSpec) -> np.ndarray:
    """One tensor, read from its shard only now, converted and quantized; the caller drops it after writing."""
    import gguf
    import torch
    from safetensors import safe_open

    if p.source is None:
        return extra[p.gguf_name]
    with safe_open(str(sources[p.source][0]), framework="pt") as f:
        tensor = _permuted(p, f.get_tensor(p.source), config, spec)
    if p.ggml_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return _quantize_by_rows(tensor, p.ggml_type)
    # F16 straight from the source dtype (the same single rounding as through float32, without that copy)
    as_f16 = p.ggml_type == gguf.GGMLQuantizationType.F16
    data = tensor.to(torch.float16 if as_f16 else torch.float32).numpy()
    del tensor
    if spec.norm_plus_one and p.gguf_name.endswith("norm.weight"):
        data = data + np.float32(1)
    return gguf.quants.quantize(np.ascontiguousarray(data), p.ggml_type)


def _permuted(p: _Planned, tensor: Any, config: Any, spec: ArchSpec) -> Any:
    if spec.permute_qk and ".attn_q." in p.gguf_name:
        return permute_qk(tensor, config.num_attention_heads, config.num_attention_heads)
    if spec.permute_qk and ".attn_k." in p.gguf_name:
        return permute_qk(tensor, config.num_attention_heads, config.num_key_value_heads)
    return tensor


# Rows are quantized this many source elements at a time (64 MiB of float32), into the one output array
ROW_CHUNK_ELEMENTS = 1 << 24


def _quantize_by_rows(tensor: Any, ggml_type: Any) -> np.ndarray:
    """gguf-py's quantizer (so blocks equal llama.cpp's) applied to row blocks: blocks never span rows,
    so the bytes equal quantizing the whole tensor, without a float32 copy of all of it."""
    import gguf

    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, ROW_CHUNK_ELEMENTS // rows.shape[1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(tuple(rows.shape), ggml_type), dtype=np.uint8)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = gguf.quants.quantize(rows[start : start + step].float().numpy(), ggml_type)
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(tuple(tensor.shape), ggml_type))
