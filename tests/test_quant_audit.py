"""QLoRA adapters on quantized bases as people publish them: bases quantized from bfloat16/float16 models,
compute dtypes that differ from the weights' dtype, bfloat16 quant_storage. Each merge is compared with
transformers' own dequantize() plus PEFT (what PEFT's 4-bit merge and bitsandbytes' MatMul4Bit start from)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core import MergeOptions, merge_adapter
from tests.factories import make_adapter
from tests.quant_factories import make_bnb_base, make_float_base

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
UNTOUCHED = "model.layers.0.self_attn.k_proj.weight"  # quantized, and no adapter target


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quant-audit")
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        make_float_base(root / name, dtype=dtype)
        make_adapter(root / name, root / f"{name}-adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def _dequantized(base: Path):
    """transformers' dequantize() of the bitsandbytes model: the stored weights through dequantize_4bit."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, device_map="cpu").dequantize()


def _peft_logits(model, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(model.float(), adapter).eval()(IDS).logits


def _merged_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.isfinite(logits).all()
    return logits


@pytest.mark.parametrize(
    "spec",
    [
        dict(kind="nf4"),
        dict(kind="fp4", double_quant=True),
        dict(kind="nf4", double_quant=True, quant_storage=torch.bfloat16),
    ],
    ids=["nf4", "fp4-dq", "nf4-dq-bf16-storage"],
)
def test_4bit_weights_dequantize_to_their_quant_state_dtype(root: Path, tmp_path: Path, spec: dict) -> None:
    """A base quantized from bfloat16 (every -bnb-4bit repo) dequantizes to bfloat16 values; the merge used the
    unrounded float32 products, so a float32 merge was off by bfloat16 rounding of every 4-bit weight."""
    base = make_bnb_base(root / "bfloat16", tmp_path / "q", load_dtype=torch.bfloat16, **spec)
    adapter = root / "bfloat16-adapter"
    merge_adapter(base, adapter, tmp_path / "merged", MergeOptions(dtype="float32"))
    dequantized = _dequantized(base)
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert torch.equal(weights[UNTOUCHED], dequantized.state_dict()[UNTOUCHED].float())
    want = _peft_logits(dequantized, adapter)
    assert float((_merged_logits(tmp_path / "merged") - want).abs().max()) < 1e-4


def _set_norm(folder: Path, value: float) -> None:
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"][0] = value
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("stored", "compute"), [("float16", torch.bfloat16), ("bfloat16", torch.float16)], ids=["f16-bf16", "bf16-f16"]
)
def test_default_dtype_is_the_weights_dtype_not_the_compute_dtype(
    root: Path, tmp_path: Path, stored: str, compute: torch.dtype
) -> None:
    """bnb_4bit_compute_dtype is the matmuls' dtype: writing the merge in it rounded a float16 model's weights to
    bfloat16, and overflowed a bfloat16 model's large weights in float16 (refused). The default keeps the dtype
    the weights are stored and dequantized in, so the unquantized weights come out unchanged."""
    float_dir = tmp_path / "float"
    make_float_base(float_dir, dtype=getattr(torch, stored))
    _set_norm(float_dir, 1e5 if stored == "bfloat16" else 1.0009765625)  # past float16 / below bfloat16 precision
    base = make_bnb_base(float_dir, tmp_path / "q", "nf4", load_dtype=getattr(torch, stored), compute_dtype=compute)
    merge_adapter(base, root / f"{stored}-adapter", tmp_path / "merged")
    got, before = load_file(tmp_path / "merged" / "model.safetensors"), load_file(base / "model.safetensors")
    assert got["model.norm.weight"].dtype == getattr(torch, stored)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name], before[name]), name
    assert torch.equal(got[UNTOUCHED], _dequantized(base).state_dict()[UNTOUCHED])
    _merged_logits(tmp_path / "merged")


# --- target original ------------------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, dict, str]:
    import json

    from merge_core.cli import main

    code = main([*argv, "--quiet", "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else {}), captured.err


def _gptq_like(float_dir: Path, path: Path) -> Path:
    """A GPTQ checkpoint's layout (qweight/qzeros/scales/g_idx): transformers needs optimum to load it."""
    import json
    import shutil

    shutil.copytree(float_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (path / "config.json").write_text(json.dumps(config))
    state: dict[str, torch.Tensor] = {}
    for name, value in load_file(float_dir / "model.safetensors").items():
        if not name.endswith("proj.weight"):
            state[name] = value
            continue
        module, (rows, cols) = name.removesuffix(".weight"), value.shape
        state[f"{module}.qweight"] = torch.zeros(cols // 8, rows, dtype=torch.int32)
        state[f"{module}.qzeros"] = torch.zeros(1, rows // 8, dtype=torch.int32)
        state[f"{module}.scales"] = torch.ones(1, rows, dtype=torch.float16)
        state[f"{module}.g_idx"] = torch.zeros(cols, dtype=torch.int32)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_original_of_a_base_that_does_not_load_here_skips_the_cost(root: Path, tmp_path: Path, capsys) -> None:
    """The way out for a GPTQ base is its original; measuring the cost loads the GPTQ model, which raised
    optimum's ImportError as a traceback after the output was written."""
    from merge_core.quant_targets import COST_ROW

    float_dir, adapter = root / "bfloat16", root / "bfloat16-adapter"
    gptq = _gptq_like(float_dir, tmp_path / "gptq")
    out, plain = tmp_path / "original", tmp_path / "plain"
    code, data, err = _cli(capsys, str(gptq), str(adapter), str(out), "--quantized-base", "original",
                           "--original-base", str(float_dir), "--verify", "--functional", "never")  # fmt: skip
    assert code == 0, err
    cost = [c for c in data["verification"]["checks"] if c["name"] == COST_ROW]
    assert len(cost) == 1 and cost[0]["passed"] is None and "does not load here" in cost[0]["detail"]
    code, _, err = _cli(capsys, str(float_dir), str(adapter), str(plain))
    assert code == 0, err
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


def test_an_original_base_that_is_quantized_is_refused(root: Path, tmp_path: Path, capsys) -> None:
    """--original-base naming a quantized model merged into it dequantized and called the result 'original'."""
    base = make_bnb_base(root / "bfloat16", tmp_path / "q", "nf4", load_dtype=torch.bfloat16)
    out = tmp_path / "out"
    code, _, err = _cli(capsys, str(base), str(root / "bfloat16-adapter"), str(out),
                        "--quantized-base", "original", "--original-base", str(base))  # fmt: skip
    assert code == 2 and "is itself quantized" in err and "--original-base" in err and not out.exists()


# --- verification ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_forward_check_on_a_bfloat16_quantized_base_runs_in_float32(
    root: Path, tmp_path: Path, capsys, kind: str
) -> None:
    """transformers loads a pre-quantized checkpoint in its own dtype whatever dtype= asks, so the reference
    PeftModel computed in bfloat16 and a right float32 merge failed 'logits max abs diff vs PeftModel' (~5e-2)."""
    base = make_bnb_base(root / "bfloat16", tmp_path / "q", kind, load_dtype=torch.bfloat16)
    out = tmp_path / "out"
    code, data, err = _cli(capsys, str(base), str(root / "bfloat16-adapter"), str(out), "--dtype", "float32",
                           "--verify", "--functional", "always")  # fmt: skip
    rows = {c["name"]: c for c in data["verification"]["checks"]}
    assert code == 0, [c for c in rows.values() if c["passed"] is False]
    assert rows["logits max abs diff vs PeftModel"]["passed"] is True


# --- adapters saved from a quantized model ----------------------------------------------------------------


def _qlora_adapter(base: Path, path: Path, **lora: object) -> Path:
    """A LoRA adapter made with PEFT on the bitsandbytes model itself, as QLoRA training saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(path)
    return path


def test_an_adapter_that_ships_a_quantized_weight_is_refused(tmp_path: Path) -> None:
    """LoRA on a 4-bit lm_head (llm_int8_skip_modules=[]): PEFT saves the quantized base layer too (packed bytes,
    absmax, quant state), which the plan looked up among the base's weights and failed with a KeyError."""
    from merge_core.errors import UnsupportedAdapterError

    float_dir = make_float_base(tmp_path / "float")
    base = make_bnb_base(float_dir, tmp_path / "q", "nf4", skip=[])
    adapter = _qlora_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    assert "base_model.model.lm_head.base_layer.weight.absmax" in load_file(adapter / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapterError, match=r"quantized copy of lm_head.*save_embedding_layers=False"):
        merge_adapter(base, adapter, tmp_path / "merged", MergeOptions(dtype="float32"))
    assert not (tmp_path / "merged").exists()
    # Without the copy, the LoRA on the 4-bit lm_head merges into what PEFT computes.
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if ".base_layer." not in k}, adapter / "adapter_model.safetensors")
    merge_adapter(base, adapter, tmp_path / "merged", MergeOptions(dtype="float32"))
    want = _peft_logits(_dequantized(base), adapter)
    assert float((_merged_logits(tmp_path / "merged") - want).abs().max()) < 1e-4
