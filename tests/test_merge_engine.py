"""The streaming merge reproduces PeftModel(base, adapter) for every adapter variant we claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge_core import MergeOptions, merge_adapter
from merge_core.safetensors_io import read_header, read_tensor
from tests.factories import greedy, load_model, logits, make_adapter, make_base, peft_reference, prompt_ids

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "llama-lora": dict(arch="llama", lora=dict(target_modules=LLAMA_LINEAR)),
    "llama-rslora-patterns": dict(
        arch="llama",
        lora=dict(
            target_modules=LLAMA_LINEAR,
            r=4,
            lora_alpha=16,
            use_rslora=True,
            rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"o_proj": 3, "k_proj": 32},
        ),
    ),
    "llama-dora": dict(arch="llama", lora=dict(target_modules=LLAMA_LINEAR, use_dora=True), magnitude_noise=0.3),
    "mistral-lora-with-head": dict(arch="mistral", lora=dict(target_modules=["q_proj", "v_proj", "lm_head"])),
    "qwen2-tied-embedding-lora": dict(arch="qwen2", lora=dict(target_modules=["q_proj", "embed_tokens"])),
    "qwen2-tied-head-lora": dict(arch="qwen2", lora=dict(target_modules=["v_proj", "lm_head"])),
    "qwen2-lora-bias": dict(arch="qwen2", lora=dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    "gpt2-conv1d": dict(arch="gpt2", lora=dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-conv1d-dora": dict(
        arch="gpt2",
        lora=dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True),
        magnitude_noise=0.3,
    ),
    "llama-embedding-dora": dict(
        arch="llama", lora=dict(target_modules=["embed_tokens", "q_proj"], use_dora=True), magnitude_noise=0.3
    ),
    "llama-modules-to-save-resized-vocab": dict(
        arch="llama",
        resize=104,
        lora=dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    ),
    "llama-embedding-lora-resized-vocab": dict(
        arch="llama", resize=104, lora=dict(target_modules=["q_proj", "embed_tokens", "lm_head"])
    ),
}


def assert_matches_peft(base: Path, adapter: Path, merged: Path, resize: int | None = None) -> float:
    vocab = resize or 96
    ids = prompt_ids(vocab=vocab)
    ref_model = peft_reference(base, adapter, resize_vocab=resize)
    merged_model, info = _load_with_info(merged)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref, got = logits(ref_model, ids), logits(merged_model, ids)
    assert got.shape == ref.shape
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-4, f"merged logits differ from PeftModel by {diff}"
    # The adapter must matter, or the comparison above proves nothing.
    base_model = load_model(base)
    if resize:
        base_model.resize_token_embeddings(resize, mean_resizing=False)
    assert (logits(base_model, ids) - ref).abs().max().item() > 1e-2
    assert torch.equal(greedy(ref_model, ids), greedy(merged_model, ids))
    return diff


def _load_with_info(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_unmerged_peft(tmp: Path, case: str) -> None:
    spec = CASES[case]
    base = make_base(tmp / "base", spec["arch"])
    adapter = make_adapter(
        base,
        tmp / "adapter",
        resize_vocab=spec.get("resize"),
        magnitude_noise=spec.get("magnitude_noise", 0.0),
        **spec["lora"],
    )
    report = merge_adapter(base, adapter, tmp / "merged")
    assert_matches_peft(base, adapter, tmp / "merged", spec.get("resize"))

    files = sorted(p.name for p in (tmp / "merged").iterdir())
    assert not any(name.startswith("adapter_") for name in files)
    for shard in report.shards:
        assert not [k for k in read_header(tmp / "merged" / shard).tensors if "lora" in k]
    assert report.modules and set(report.changed_tensors) >= {m.tensor for m in report.modules}


def test_tied_embedding_lora_unties_the_head(tmp: Path) -> None:
    base = make_base(tmp / "base", "qwen2")
    assert "lm_head.weight" not in read_header(tmp / "base" / "model.safetensors").tensors
    adapter = make_adapter(base, tmp / "adapter", target_modules=["embed_tokens"])
    report = merge_adapter(base, adapter, tmp / "merged")
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    header = read_header(tmp / "merged" / "model.safetensors")
    head = read_tensor(header.path, header.tensors["lm_head.weight"])
    base_header = read_header(tmp / "base" / "model.safetensors")
    base_embed = read_tensor(base_header.path, base_header.tensors["model.embed_tokens.weight"])
    assert torch.equal(head, base_embed)  # the head keeps the original matrix; only lookups change
    assert any("tie_word_embeddings" in n for n in report.notes)


def test_resized_vocab_updates_config_and_uses_adapter_tokenizer(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(
        base, tmp / "adapter", resize_vocab=104, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    (tmp / "adapter" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "marker": "adapter"}))
    (tmp / "base" / "tokenizer_config.json").write_text(json.dumps({"marker": "base"}))
    merge_adapter(base, adapter, tmp / "merged")
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 104
    assert json.loads((tmp / "merged" / "tokenizer_config.json").read_text())["marker"] == "adapter"
    assert (tmp / "merged" / "generation_config.json").is_file()


def test_untouched_tensors_are_bit_identical(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj"])
    report = merge_adapter(base, adapter, tmp / "merged")
    src = read_header(tmp / "base" / "model.safetensors")
    out = read_header(tmp / "merged" / "model.safetensors")
    assert set(src.tensors) == set(out.tensors)
    changed = set(report.changed_tensors)
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    raw_src, raw_out = src.path.read_bytes(), out.path.read_bytes()
    for name, info in src.tensors.items():
        o = out.tensors[name]
        same = raw_src[info.begin : info.end] == raw_out[o.begin : o.end]
        assert same == (name not in changed), name


def test_multi_shard_base_and_output(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama", max_shard_size="30KB")
    assert (tmp / "base" / "model.safetensors.index.json").is_file()
    adapter = make_adapter(base, tmp / "adapter", target_modules=LLAMA_LINEAR)
    report = merge_adapter(base, adapter, tmp / "merged", MergeOptions(max_shard_size=20_000))
    assert len(report.shards) > 2
    index = json.loads((tmp / "merged" / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    data_bytes = 0
    for shard in report.shards:
        header = read_header(tmp / "merged" / shard)
        data_bytes += header.nbytes
        # No shard exceeds the limit unless it holds a single tensor larger than the limit.
        assert header.nbytes <= 20_000 or len(header.tensors) == 1
        for name in header.tensors:
            seen[name] = shard
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == data_bytes
    assert_matches_peft(base, adapter, tmp / "merged")


def test_bf16_output_is_rounded_once_from_float64(tmp: Path, record_property) -> None:
    """Every merged element equals round_bf16(W + scale*B@A computed in float64): bitwise."""
    base = make_base(tmp / "base", "llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp / "adapter", target_modules=LLAMA_LINEAR, r=8, lora_alpha=16)
    report = merge_adapter(base, adapter, tmp / "merged")
    assert report.output_dtype == "bfloat16"
    src = read_header(tmp / "base" / "model.safetensors")
    out = read_header(tmp / "merged" / "model.safetensors")
    ad = read_header(tmp / "adapter" / "adapter_model.safetensors")

    peft_model = peft_reference(base, adapter, dtype=torch.bfloat16).merge_and_unload()
    peft_state = peft_model.state_dict()
    ours_equal = peft_equal = total = 0
    for m in report.modules:
        w = read_tensor(src.path, src.tensors[m.tensor]).double()
        a = read_tensor(ad.path, ad.tensors[f"base_model.model.{m.module}.lora_A.weight"]).double()
        b = read_tensor(ad.path, ad.tensors[f"base_model.model.{m.module}.lora_B.weight"]).double()
        reference = (w + m.scale * (b @ a)).to(torch.bfloat16)
        ours = read_tensor(out.path, out.tensors[m.tensor])
        assert ours.dtype == torch.bfloat16
        ours_equal += int((ours.view(torch.int16) == reference.view(torch.int16)).sum())
        peft_equal += int((peft_state[m.tensor].view(torch.int16) == reference.view(torch.int16)).sum())
        total += reference.numel()
    record_property("bf16_bitwise_ours", ours_equal / total)
    record_property("bf16_bitwise_peft_merge_and_unload", peft_equal / total)
    print(
        f"bf16 bitwise agreement with float64 reference: ours {ours_equal / total:.6f}, "
        f"PEFT merge_and_unload {peft_equal / total:.6f} ({total} elements)"
    )
    assert ours_equal == total


def test_output_dtype_conversion(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj"])
    merge_adapter(base, adapter, tmp / "merged", MergeOptions(dtype="float16"))
    header = read_header(tmp / "merged" / "model.safetensors")
    assert {t.dtype for t in header.tensors.values()} == {"F16"}
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    model = load_model(tmp / "merged", torch.float32)
    ref = logits(peft_reference(base, adapter), prompt_ids())
    assert (logits(model, prompt_ids()) - ref).abs().max().item() < 0.05


def test_pickle_adapter_is_loaded_without_executing_code(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj", "v_proj"])
    state = {}
    header = read_header(tmp / "adapter" / "adapter_model.safetensors")
    for name, info in header.tensors.items():
        state[name] = read_tensor(header.path, info).clone()
    (tmp / "adapter" / "adapter_model.safetensors").unlink()
    torch.save(state, tmp / "adapter" / "adapter_model.bin")
    merge_adapter(base, adapter, tmp / "merged")
    assert_matches_peft(base, adapter, tmp / "merged")


def test_merged_model_loads_without_peft(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(base, tmp / "adapter", target_modules=LLAMA_LINEAR)
    merge_adapter(base, adapter, tmp / "merged")
    ids = prompt_ids()
    expected = logits(peft_reference(base, adapter), ids)
    torch.save(ids, tmp / "ids.pt")
    script = (
        "import sys, torch; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp / 'merged')!r}, dtype=torch.float32).eval()\n"
        f"ids = torch.load({str(tmp / 'ids.pt')!r})\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits\n"
        f"torch.save(out, {str(tmp / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    got = torch.load(tmp / "out.pt")
    assert (got - expected).abs().max().item() <= 1e-4


def test_cli_merges_and_reports(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "merge_core",
            str(base),
            str(adapter),
            str(tmp / "merged"),
            "--quiet",
            "--json",
            "--max-shard-size",
            "40KB",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["modules"]) == 2 and len(report["shards"]) > 1
    assert_matches_peft(base, adapter, tmp / "merged")
    again = subprocess.run(
        [sys.executable, "-m", "merge_core", str(base), str(adapter), str(tmp / "merged"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert again.returncode == 2 and "already exists" in again.stderr
