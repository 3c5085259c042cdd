"""Quantized bases end to end: the default merge dequantizes exactly as training computed,
adds the adapter, and writes a plain model that loads without quantization_config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_core import MergeOptions, merge_adapter
from merge_core.errors import AdapterBaseMismatchError
from merge_core.plan import build_plan
from merge_core.verify import verify_merge
from tests.factories import make_adapter
from tests.quant_factories import make_bnb_base, make_float_base, make_fp8_base

KINDS = {
    "nf4": dict(kind="nf4"),
    "nf4-dq": dict(kind="nf4", double_quant=True),
    "fp4": dict(kind="fp4"),
    "fp4-dq": dict(kind="fp4", double_quant=True),
    "int8": dict(kind="int8"),
    "fp8-tensor": dict(block=None),
    "fp8-block": dict(block=(16, 16)),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qmerge")
    make_float_base(root / "float")
    make_adapter(root / "float", root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def _quantized(root: Path, key: str) -> Path:
    folder = root / key
    if not folder.exists():
        spec = dict(KINDS[key])
        if key.startswith("fp8"):
            make_fp8_base(root / "float", folder, block=spec["block"])
        else:
            make_bnb_base(root / "float", folder, spec.pop("kind"), **spec)
    return folder


def _trained_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """What base + adapter computed in training: PeftModel on the quantized model (train mode, no dropout)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(base, device_map="cpu", dtype=torch.float32)
    model = PeftModel.from_pretrained(quantized, adapter)
    model.train()  # eval mode on CPU repacks bitsandbytes weights (see tests/test_quantized.py)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("key", ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"])
def test_bitsandbytes_base_merges_into_what_was_trained(root: Path, tmp: Path, key: str) -> None:
    from transformers import AutoModelForCausalLM

    base = _quantized(root, key)
    report = merge_adapter(base, root / "adapter", tmp / "merged", MergeOptions(dtype="float32"))
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert any("quantized" in note for note in report.notes)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(ids).logits
    assert float((got - _trained_logits(base, root / "adapter", ids)).abs().max()) < 1e-4
    weights = load_file(tmp / "merged" / "model.safetensors")
    assert not [n for n in weights if n.endswith(("absmax", "quant_map", "SCB", "weight_format")) or "quant_state" in n]


@pytest.mark.parametrize("key", ["fp8-tensor", "fp8-block"])
def test_fp8_base_merges_into_its_dequantized_weights(root: Path, tmp: Path, key: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merge_core.checkpoint import load_base_checkpoint
    from merge_core.quant import checkpoint_reader, dequantize_tensor
    from merge_core.safetensors_io import OpenFiles

    base = _quantized(root, key)
    merge_adapter(base, root / "adapter", tmp / "merged", MergeOptions(dtype="float32"))
    checkpoint = load_base_checkpoint(base)
    files = OpenFiles()
    try:
        read = checkpoint_reader(checkpoint.tensors, files)
        dequantized = {n: dequantize_tensor(q, read) for n, q in checkpoint.quant.tensors.items()}
    finally:
        files.close()
    reference = AutoModelForCausalLM.from_pretrained(root / "float", dtype=torch.float32)
    reference.load_state_dict(dequantized, strict=False)
    reference = PeftModel.from_pretrained(reference, root / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((merged(ids).logits - reference(ids).logits).abs().max()) < 1e-4
    # A weight the adapter leaves alone is the dequantized weight, rounded once (exact in float32).
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(load_file(tmp / "merged" / "model.safetensors")[untouched], dequantized[untouched])


def test_quantized_merge_passes_the_streamed_verification(root: Path, tmp: Path) -> None:
    base = _quantized(root, "nf4-dq")
    plan = build_plan(base, root / "adapter", MergeOptions(dtype="bfloat16"))
    merge_adapter(base, root / "adapter", tmp / "merged", MergeOptions(dtype="bfloat16"))
    report = verify_merge(plan, tmp / "merged", functional="never")
    assert report.passed, report.to_text()
    assert report.check("merged = float64 reference rounded once").passed


def test_default_dtype_is_the_dtype_of_the_weights(root: Path, tmp: Path) -> None:
    base = _quantized(root, "nf4")  # quantized from float32 (test_quant_audit.py: other dtypes and compute dtypes)
    merge_adapter(base, root / "adapter", tmp / "merged")
    weights = load_file(tmp / "merged" / "model.safetensors")
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32


def test_mismatched_adapter_on_a_quantized_base_names_both_models(root: Path, tmp: Path) -> None:
    other = make_float_base(tmp / "other-float")
    config = json.loads((other / "config.json").read_text())
    config.update(hidden_size=128, intermediate_size=256)
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(
        LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    ).save_pretrained(tmp / "wide")
    make_adapter(tmp / "wide", tmp / "wide-adapter", target_modules=["q_proj"])
    options = MergeOptions(base_name="someone/tiny-llama-bnb-4bit")  # as the CLI passes what the user typed
    with pytest.raises(AdapterBaseMismatchError, match=r"LoRA maps 128 -> \d+ features.*has shape \[64, 64\]") as info:
        merge_adapter(_quantized(root, "nf4"), tmp / "wide-adapter", tmp / "merged", options)
    message = str(info.value)
    assert "someone/tiny-llama-bnb-4bit" in message and str(tmp / "wide") in message
    assert "[8192, 1]" not in message and not (tmp / "merged").exists()


def test_quantized_base_by_hub_id_is_planned_from_headers_and_merged(root: Path, tmp: Path, hub_server) -> None:
    """The Hub path: a 4-bit base's shapes come from its config before any shard is read; the merge equals
    the local one bit for bit; a wrong adapter is refused before any shard is downloaded."""
    from merge_core.pipeline import MergeRequest, run_merge
    from tests.conftest import ALICE, with_config

    base = _quantized(root, "nf4-dq")
    adapter = with_config(root / "adapter", tmp / "qlora", base_model_name_or_path="acme/tiny-llama-bnb-4bit")
    for repo, folder in (("acme/tiny-llama-bnb-4bit", base), ("alice/qlora", adapter)):
        hub_server.create_repo(repo)
        hub_server.upload_dir(repo, folder)
    result = run_merge(
        MergeRequest(adapter="alice/qlora", dtype="float32", token=ALICE, endpoint=hub_server.url),
        tmp / "work",
        verify=False,
    )
    merge_adapter(base, adapter, tmp / "local", MergeOptions(dtype="float32"))
    got, want = load_file(result.output_dir / "model.safetensors"), load_file(tmp / "local" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    wide = make_float_base(tmp / "wide-float")
    config = json.loads((wide / "config.json").read_text())
    config.update(hidden_size=128, intermediate_size=256, head_dim=32)
    (wide / "config.json").write_text(json.dumps(config))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(wide, ignore_mismatched_sizes=True).save_pretrained(tmp / "wide")
    make_adapter(tmp / "wide", tmp / "wide-lora", target_modules=["q_proj"])
    hub_server.create_repo("alice/wide-lora")
    hub_server.upload_dir("alice/wide-lora", tmp / "wide-lora")
    hub_server.clear_log()
    with pytest.raises(AdapterBaseMismatchError, match="acme/tiny-llama-bnb-4bit"):
        run_merge(
            MergeRequest(
                adapter="alice/wide-lora", base="acme/tiny-llama-bnb-4bit", token=ALICE, endpoint=hub_server.url
            ),
            tmp / "work2",
        )
    shard_reads = [
        r
        for r in hub_server.requests_for(method="GET", path_contains="model.safetensors")
        if "adapter_model" not in r.path and not r.headers.get("Range", r.headers.get("range"))
    ]
    assert shard_reads == [], [r.path for r in shard_reads]
