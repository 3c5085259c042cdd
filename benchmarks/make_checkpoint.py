#!/usr/bin/env python3
"""Write a synthetic Llama-style HF checkpoint plus a PEFT LoRA adapter, fast.

Usage:
    python benchmarks/make_checkpoint.py OUT_DIR --params 8B [--dtype bfloat16]
        [--shard-size 2GB] [--rank 16] [--adapter-out DIR] [--seed 0]
    python benchmarks/make_checkpoint.py --self-check

The point is to produce realistic *shapes and file layout* for merge benchmarks
(sizes up to tens of GB) in roughly disk-write time.  Therefore:

* no nn.Module is ever built: tensors exist only as (name, shape) specs;
* tensor bytes come from one pre-generated pseudo-random block (~32 MiB) that
  is streamed to disk at a random offset per tensor, so memory stays bounded
  by that block no matter how large the model is;
* the safetensors header is written by hand (8-byte LE length + JSON, padded to
  8 bytes), then the data, tensor after tensor; the layout (shard split rule,
  file names, index JSON) follows transformers' ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None  # None -> hidden // heads
    max_positions: int = 4096
    rope_theta: float = 10000.0

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def q_out(self) -> int:
        return self.heads * self.hd

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.hd

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of the 7 LoRA-targeted projections of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "self_attn.q_proj": (self.q_out, h),
            "self_attn.k_proj": (self.kv_out, h),
            "self_attn.v_proj": (self.kv_out, h),
            "self_attn.o_proj": (h, self.q_out),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    def param_count(self) -> int:
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden
        # untied embeddings: embed_tokens + lm_head, plus the final norm
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden


# Named presets.  Shapes are those of real public models where one fits, so the
# per-tensor sizes (which drive merge cost) are realistic.  Embeddings are untied.
#   name : shape                                                      ~params  modelled on
PRESETS: dict[str, LlamaShape] = {
    # 1024/2816 as a "0.5B" per the brief, but 32 layers (24 would be 0.37B).
    "0.5B": LlamaShape(1024, 2816, 32, 16, 16, 32000),  # 0.48B
    "1B": LlamaShape(2048, 5632, 22, 32, 4, 32000),  # 1.10B  TinyLlama-1.1B
    # 36 layers instead of 32 (32 would give 2.70B).
    "3B": LlamaShape(2560, 6912, 36, 32, 32, 32000),  # 3.02B  (head_dim 80)
    "8B": LlamaShape(4096, 14336, 32, 32, 8, 128256, max_positions=8192, rope_theta=500000.0),  # 8.03B Llama-3-8B
    "13B": LlamaShape(5120, 13824, 40, 40, 40, 32000),  # 13.0B  Llama-2-13B
    "30B": LlamaShape(6656, 17920, 60, 52, 52, 32000),  # 32.5B  LLaMA-30B
    "70B": LlamaShape(8192, 28672, 80, 64, 8, 128256, max_positions=8192, rope_theta=500000.0),  # 70.6B Llama-3-70B
}

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_param_count(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse parameter count {text!r} (try 0.5B, 100M, 1.5e8)")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


def solve_shape(target: float) -> LlamaShape:
    """Pick a Llama-like shape with roughly `target` parameters.

    Keeps the usual aspect ratio (hidden / layers ~ 96, intermediate ~ 8/3 hidden
    rounded to 256) and searches hidden in steps of 64 for the closest count.
    Small models get a small vocab so that they are not all embedding.
    """
    vocab = 32000 if target >= 2e8 else 8000
    best: tuple[float, LlamaShape] | None = None
    for hidden in range(128, 16385, 64):
        head_dim = 64 if hidden < 2048 else 128
        if hidden % head_dim:
            continue
        inter = int(math.ceil(hidden * 8 / 3 / 256) * 256)
        probe = LlamaShape(hidden, inter, 1, hidden // head_dim, hidden // head_dim, vocab)
        per_layer = probe.param_count() - (2 * vocab * hidden + hidden)
        layers = round((target - 2 * vocab * hidden - hidden) / per_layer)
        if layers < 2 or layers > 128:
            continue
        shape = LlamaShape(hidden, inter, layers, hidden // head_dim, hidden // head_dim, vocab)
        # Penalise both missing the target and a weird depth/width ratio.
        score = abs(math.log(shape.param_count() / target)) + 0.1 * abs(math.log(layers / (hidden / 96)))
        if best is None or score < best[0]:
            best = (score, shape)
    if best is None:
        raise SystemExit(f"no Llama shape found for {target:.3g} params (too small?)")
    return best[1]


def shape_for(params: str) -> LlamaShape:
    key = params.strip().upper()
    if key in PRESETS:
        return PRESETS[key]
    return solve_shape(parse_param_count(params))


# ---------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------

DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    fill: str = "random"  # "random" (N(0, 0.02)) or "ones" (norm weights)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class BytePool:
    """A fixed block of pseudo-random values, streamed cyclically.

    Generating fresh randoms for 60 GB would dominate run time; cycling a
    32 MiB block from a random offset is indistinguishable for merge-speed
    purposes and keeps memory flat.
    """

    def __init__(self, dtype: torch.dtype, nbytes: int = 32 << 20, seed: int = 0, std: float = 0.02) -> None:
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        gen = torch.Generator().manual_seed(seed)
        vals = (torch.randn(nbytes // self.itemsize, generator=gen) * std).to(dtype)
        self.buf = memoryview(vals.view(torch.uint8).numpy().tobytes())
        self.ones_item = torch.ones(1, dtype=dtype).view(torch.uint8).numpy().tobytes()
        self.gen = gen

    def write(self, f: BinaryIO, nbytes: int) -> None:
        n = len(self.buf)
        start = int(torch.randint(0, n // self.itemsize, (1,), generator=self.gen)) * self.itemsize
        while nbytes > 0:
            chunk = self.buf[start : start + min(nbytes, n - start)]
            f.write(chunk)
            nbytes -= len(chunk)
            start = 0

    def write_ones(self, f: BinaryIO, numel: int) -> None:
        block = self.ones_item * min(numel, 1 << 20)
        while numel > 0:
            k = min(numel, 1 << 20)
            f.write(block[: k * self.itemsize])
            numel -= k


def write_safetensors(path: Path, specs: list[TensorSpec], st_dtype: str, pool: BytePool) -> int:
    """Write one safetensors file tensor by tensor; returns data bytes written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        nbytes = s.numel * pool.itemsize
        header[s.name] = {"dtype": st_dtype, "shape": list(s.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    with open(path, "wb", buffering=0) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            if s.fill == "ones":
                pool.write_ones(f, s.numel)
            else:
                pool.write(f, s.numel * pool.itemsize)
    return offset


# ---------------------------------------------------------------------------
# Checkpoint layout
# ---------------------------------------------------------------------------

_SIZE_UNITS = {
    "TB": 10**12,
    "GB": 10**9,
    "MB": 10**6,
    "KB": 10**3,
    "TIB": 2**40,
    "GIB": 2**30,
    "MIB": 2**20,
    "KIB": 2**10,
}


def parse_size(text: str) -> int:
    """Same units as transformers' max_shard_size (GB = 1e9), plus GiB/MiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (try 2GB, 500MB)")
    return int(float(m.group(1)) * _SIZE_UNITS.get(m.group(2) or "", 1))


def model_specs(shape: LlamaShape) -> list[TensorSpec]:
    """Tensors in LlamaForCausalLM.state_dict() order (what save_pretrained shards by)."""
    specs = [TensorSpec("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        specs += [TensorSpec(f"{p}.{mod}.weight", oi) for mod, oi in shape.linear_shapes().items()]
        specs += [
            TensorSpec(f"{p}.input_layernorm.weight", (shape.hidden,), "ones"),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (shape.hidden,), "ones"),
        ]
    specs += [
        TensorSpec("model.norm.weight", (shape.hidden,), "ones"),
        TensorSpec("lm_head.weight", (shape.vocab, shape.hidden)),
    ]
    return specs


def split_shards(specs: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[TensorSpec]]:
    """huggingface_hub.split_torch_state_dict_into_shards' rule, on specs."""
    shards: list[list[TensorSpec]] = []
    cur: list[TensorSpec] = []
    cur_bytes = 0
    for s in specs:
        nbytes = s.numel * itemsize
        if nbytes > max_bytes:  # oversize tensor gets its own shard
            shards.append([s])
            continue
        if cur_bytes + nbytes > max_bytes and cur:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def write_configs(out: Path, shape: LlamaShape, dtype: str) -> None:
    # Built from transformers' own classes so config.json carries every field a
    # loader expects; constructing a config is cheap (no weights).
    from transformers import GenerationConfig, LlamaConfig

    big_vocab = shape.vocab >= 128000
    cfg = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hd,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000 if big_vocab else 1,
        eos_token_id=128001 if big_vocab else 2,
        dtype=dtype,
    )
    cfg.save_pretrained(out)
    GenerationConfig.from_model_config(cfg).save_pretrained(out)


@dataclass
class WriteReport:
    path: str
    files: list[str] = field(default_factory=list)
    params: int = 0
    bytes: int = 0
    largest_file_bytes: int = 0
    seconds: float = 0.0


def write_model(out: Path, shape: LlamaShape, dtype: str, shard_bytes: int, seed: int) -> WriteReport:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype, st_dtype = DTYPES[dtype]
    pool = BytePool(torch_dtype, seed=seed)
    specs = model_specs(shape)
    shards = split_shards(specs, pool.itemsize, shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    rep = WriteReport(str(out))
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        nbytes = write_safetensors(out / name, shard, st_dtype, pool)
        rep.files.append(name)
        rep.bytes += nbytes
        rep.largest_file_bytes = max(rep.largest_file_bytes, (out / name).stat().st_size)
        weight_map.update({s.name: name for s in shard})
        print(f"  wrote {name}  {nbytes / 1e9:.3f} GB  ({time.perf_counter() - t0:.1f}s)", flush=True)
    rep.params = sum(s.numel for s in specs)
    if n > 1:  # save_pretrained writes an index only when sharded
        index = {"metadata": {"total_parameters": rep.params, "total_size": rep.bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_configs(out, shape, dtype)
    rep.seconds = time.perf_counter() - t0
    return rep


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_specs(shape: LlamaShape, rank: int) -> list[TensorSpec]:
    specs: list[TensorSpec] = []
    for i in range(shape.layers):
        for mod, (o, inn) in shape.linear_shapes().items():
            p = f"base_model.model.model.layers.{i}.{mod}"
            # B is random too (PEFT inits it to zero): a zero delta would let
            # a merge engine look correct while skipping the matmul.
            specs.append(TensorSpec(f"{p}.lora_A.weight", (rank, inn)))
            specs.append(TensorSpec(f"{p}.lora_B.weight", (o, rank)))
    return specs


def write_adapter(out: Path, base_dir: Path, shape: LlamaShape, dtype: str, rank: int, seed: int) -> WriteReport:
    from peft import LoraConfig

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype, st_dtype = DTYPES[dtype]
    pool = BytePool(torch_dtype, nbytes=8 << 20, seed=seed + 1)
    specs = adapter_specs(shape, rank)
    rep = WriteReport(str(out))
    rep.bytes = write_safetensors(out / "adapter_model.safetensors", specs, st_dtype, pool)
    rep.files = ["adapter_model.safetensors"]
    rep.largest_file_bytes = (out / "adapter_model.safetensors").stat().st_size
    rep.params = sum(s.numel for s in specs)
    LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_dir.resolve()),
    ).save_pretrained(str(out))
    rep.seconds = time.perf_counter() - t0
    return rep


def build(
    out: Path, params: str, dtype: str, shard_size: str, rank: int, adapter_out: Path | None, seed: int
) -> tuple[WriteReport, WriteReport]:
    shape = shape_for(params)
    adapter_dir = adapter_out or Path(f"{out}-lora-r{rank}")
    print(
        f"shape: hidden={shape.hidden} inter={shape.intermediate} layers={shape.layers} heads={shape.heads} "
        f"kv_heads={shape.kv_heads} head_dim={shape.hd} vocab={shape.vocab} -> "
        f"{shape.param_count() / 1e9:.3f}B params, {dtype}",
        flush=True,
    )
    m = write_model(out, shape, dtype, parse_size(shard_size), seed)
    print(
        f"model:   {out}  {m.params / 1e9:.3f}B params, {m.bytes / 1e9:.3f} GB in {len(m.files)} file(s), "
        f"largest {m.largest_file_bytes / 1e9:.3f} GB, {m.seconds:.1f}s "
        f"({m.bytes / 1e9 / max(m.seconds, 1e-9):.2f} GB/s)"
    )
    a = write_adapter(adapter_dir, out, shape, dtype, rank, seed)
    print(
        f"adapter: {adapter_dir}  r={rank} alpha={2 * rank}, {a.params / 1e6:.2f}M params, "
        f"{a.bytes / 1e6:.1f} MB, {a.seconds:.1f}s"
    )
    return m, a


# ---------------------------------------------------------------------------
# Self-check: the files must load with the real libraries
# ---------------------------------------------------------------------------


def self_check() -> None:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="mkckpt-") as tmp:
        base, adapter = Path(tmp) / "base", Path(tmp) / "lora"
        # Small shard size so the sharded (index.json) path is exercised.
        m, _ = build(base, "0.02B", "bfloat16", "8MB", 8, adapter, seed=0)
        assert len(m.files) > 1 and (base / "model.safetensors.index.json").exists()

        model, info = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"loading info not clean: {bad}"
        assert model.num_parameters() == m.params, (model.num_parameters(), m.params)
        index = json.loads((base / "model.safetensors.index.json").read_text())
        sd = model.state_dict()
        for name in [
            "model.embed_tokens.weight",
            "model.layers.1.mlp.down_proj.weight",
            "lm_head.weight",
            "model.norm.weight",
        ]:
            with safe_open(base / index["weight_map"][name], "pt") as f:
                assert torch.equal(f.get_tensor(name), sd[name]), name
        w_q = sd["model.layers.0.self_attn.q_proj.weight"].float().clone()

        pm = PeftModel.from_pretrained(model, str(adapter))
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            a_file = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            b_file = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
            n_keys = len(list(f.keys()))
        q = pm.base_model.model.model.layers[0].self_attn.q_proj
        assert torch.equal(q.lora_A["default"].weight, a_file), "lora_A not loaded from file"
        assert torch.equal(q.lora_B["default"].weight, b_file), "lora_B not loaded from file"
        assert float(b_file.float().abs().sum()) > 0
        n_lora = sum(1 for k, _ in pm.named_parameters() if "lora_" in k)
        assert n_lora == n_keys, (n_lora, n_keys)

        with torch.no_grad():
            logits = pm(torch.tensor([[1, 5, 9, 42]])).logits
        assert torch.isfinite(logits.float()).all()

        merged = pm.merge_and_unload()
        w_m = merged.model.layers[0].self_attn.q_proj.weight.float()
        expect = w_q + 2.0 * (b_file.float() @ a_file.float())  # scale = alpha / r = 2
        err = float((w_m - expect).abs().max())
        assert err < 1e-2 and not torch.equal(w_m, w_q), err
    print(
        "self-check OK: transformers loaded the sharded checkpoint cleanly, PEFT loaded every LoRA tensor, "
        "merge matches W + 2*B@A"
    )


def main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", type=Path)
    ap.add_argument(
        "--params", default="0.5B", help=f"preset ({', '.join(PRESETS)}) or a number like 0.02B, 100M, 1.5e8"
    )
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--shard-size", default="2GB", help="max shard size, transformers units (GB = 1e9 bytes)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapter-out", type=Path, default=None, help="default: OUT_DIR-lora-r{rank}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite OUT_DIR / adapter dir if they exist")
    ap.add_argument(
        "--self-check",
        action="store_true",
        help="build a tiny checkpoint in a temp dir and load it with transformers + peft",
    )
    args = ap.parse_args(list(argv) if argv is not None else None)

    if args.self_check:
        self_check()
        return
    if args.out_dir is None:
        ap.error("OUT_DIR is required (or use --self-check)")
    adapter_dir = args.adapter_out or Path(f"{args.out_dir}-lora-r{args.rank}")
    for d in (args.out_dir, adapter_dir):
        if d.exists() and any(d.iterdir()):
            if not args.force:
                sys.exit(f"{d} exists and is not empty (use --force)")
            shutil.rmtree(d)
    t0 = time.perf_counter()
    build(args.out_dir, args.params, args.dtype, args.shard_size, args.rank, adapter_dir, args.seed)
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
