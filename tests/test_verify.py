"""The verification table passes on good merges and catches each planted fault with its own check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core import MergeOptions, build_plan, execute_plan
from merge_core.cli import main as cli_main
from merge_core.verify import verify_merge
from tests.factories import make_adapter, make_base, make_tokenizer

VARIANTS = {
    "lora": dict(arch="llama", lora=dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora-patterns": dict(
        arch="llama",
        lora=dict(
            target_modules=["q_proj", "o_proj"],
            use_rslora=True,
            rank_pattern={"o_proj": 2},
            alpha_pattern={"q_proj": 5},
        ),
    ),
    "dora": dict(arch="llama", lora=dict(target_modules=["q_proj", "up_proj"], use_dora=True), noise=0.3),
    "conv1d-dora": dict(
        arch="gpt2", lora=dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True), noise=0.3
    ),
    "embedding-dora-tied": dict(
        arch="qwen2", lora=dict(target_modules=["embed_tokens", "q_proj"], use_dora=True), noise=0.3
    ),
    "lora-bias": dict(arch="qwen2", lora=dict(target_modules=["k_proj"], lora_bias=True)),
    "modules-to-save-resized": dict(
        arch="llama", resize=100, lora=dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    ),
    "bf16": dict(arch="llama", dtype=torch.bfloat16, lora=dict(target_modules=["q_proj", "gate_proj"])),
}


def merged_case(tmp: Path, spec: dict, tokenizer: bool = False):
    base = make_base(tmp / "base", spec["arch"], dtype=spec.get("dtype", torch.float32))
    if tokenizer:
        make_tokenizer(base)
    adapter = make_adapter(
        base, tmp / "adapter", resize_vocab=spec.get("resize"), magnitude_noise=spec.get("noise", 0.0), **spec["lora"]
    )
    plan = build_plan(base, adapter, MergeOptions())
    execute_plan(plan, tmp / "merged")
    return plan, tmp / "merged"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_check_passes_with_measured_values(tmp: Path, variant: str) -> None:
    plan, merged = merged_case(tmp, VARIANTS[variant])
    report = verify_merge(plan, merged, functional="always")
    assert report.passed, report.to_text()
    assert all(c.passed is True for c in report.checks), report.to_text()  # nothing skipped on tiny models
    assert {c.group for c in report.checks} == {"structure", "numerics", "function"}
    assert all(c.value not in ("", "-") for c in report.checks)
    if variant != "modules-to-save-resized":
        assert report.modules and all(m.bitwise_fraction == 1.0 for m in report.modules)


# --- planted faults -----------------------------------------------------------------------------


@pytest.fixture
def good(tmp: Path):
    spec = dict(arch="llama", lora=dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    plan, merged = merged_case(tmp, spec, tokenizer=True)
    assert verify_merge(plan, merged, functional="always").passed
    return plan, merged


def rewrite(merged: Path, name: str, fn) -> None:
    path = merged / "model.safetensors"
    state = load_file(path)
    state[name] = fn(state[name]).contiguous()
    save_file(state, path, metadata={"format": "pt"})


def lora(plan, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    lm = plan.adapter.lora_modules[module]
    scale = next(m.scale for m in plan.modules if m.module == module)
    return plan.adapter.tensor(lm.a).double(), plan.adapter.tensor(lm.b).double(), scale


def base_tensor(plan, name: str) -> torch.Tensor:
    return load_file(plan.base.path / "model.safetensors")[name]


def failed(report) -> set[str]:
    return {c.name for c in report.failed()}


Q = "model.layers.0.self_attn.q_proj"


def test_wrong_scale_is_caught(good) -> None:
    plan, merged = good
    a, b, s = lora(plan, Q)
    rewrite(merged, f"{Q}.weight", lambda w: (base_tensor(plan, f"{Q}.weight").double() + 2 * s * (b @ a)).float())
    report = verify_merge(plan, merged, functional="never")
    assert {
        "merged = float64 reference rounded once",
        "relative error vs float64 reference",
        "random probe W'x vs Wx + s·B(Ax)",
    } <= failed(report)
    assert Q in report.check("merged = float64 reference rounded once").value  # the worst module is named
    assert not failed(report) & {"no NaN/Inf", "untouched tensors bit-identical to base"}


def test_transposed_delta_is_caught(good) -> None:
    plan, merged = good
    a, b, s = lora(plan, Q)
    rewrite(merged, f"{Q}.weight", lambda w: (base_tensor(plan, f"{Q}.weight").double() + s * (b @ a).T).float())
    report = verify_merge(plan, merged, functional="never")
    assert "random probe W'x vs Wx + s·B(Ax)" in failed(report)
    assert "merged = float64 reference rounded once" in failed(report)


def test_skipped_module_is_caught(good) -> None:
    plan, merged = good
    rewrite(merged, f"{Q}.weight", lambda w: base_tensor(plan, f"{Q}.weight"))
    report = verify_merge(plan, merged, functional="never")
    assert "every adapted tensor changed" in failed(report)
    assert Q in report.check("every adapted tensor changed").detail


def test_nan_in_one_tensor_is_caught(good) -> None:
    plan, merged = good
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(w):
        w = w.clone()
        w[3, 5] = float("nan")
        return w

    rewrite(merged, name, poison)
    report = verify_merge(plan, merged, functional="never")
    assert "no NaN/Inf" in failed(report)
    assert name in report.check("no NaN/Inf").detail


def test_changed_untouched_tensor_is_caught(good) -> None:
    plan, merged = good
    name = "model.layers.0.input_layernorm.weight"
    rewrite(merged, name, lambda w: w + 1e-3)
    report = verify_merge(plan, merged, functional="never")
    assert failed(report) == {"untouched tensors bit-identical to base"}
    assert name in report.check("untouched tensors bit-identical to base").detail


def test_missing_tokenizer_file_is_caught(good) -> None:
    plan, merged = good
    (merged / "tokenizer.json").unlink()
    report = verify_merge(plan, merged, functional="never")
    assert failed(report) == {"config and tokenizer files present and loadable"}
    assert "tokenizer.json" in report.check("config and tokenizer files present and loadable").detail


def test_over_budget_causal_lm_is_checked_layer_by_layer(good) -> None:
    plan, merged = good
    report = verify_merge(plan, merged, functional="auto", memory_budget=1000)
    fn = {c.name: c for c in report.checks if c.group == "function"}
    logits = fn["logits max abs diff vs PeftModel"]
    assert logits.passed is True and "layer by layer" in logits.detail
    assert fn["top-1 token agreement"].passed is True and fn["adapter changes the output"].passed is True
    greedy = fn["greedy continuation identical"]
    assert greedy.passed is None and "whole model" in greedy.detail and "GB" in greedy.detail
    assert report.passed  # skipped is not failed, and the table says so


def test_cli_verify_exit_codes(tmp: Path, capsys, monkeypatch) -> None:
    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj"])
    assert cli_main([str(base), str(adapter), str(tmp / "ok"), "--verify", "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verification"]["passed"] is True
    # A broken engine (a doubled delta) must turn the verification red and the exit code non-zero.
    import merge_core.tensor_math as tm

    monkeypatch.setattr(
        tm.LoadedDelta,
        "add_rows_to",
        lambda self, block, a: torch.addmm(block, self.left[a : a + block.shape[0]], self.right, alpha=2 * self.scale),
    )
    assert cli_main([str(base), str(adapter), str(tmp / "bad"), "--verify", "--quiet"]) == 1
    assert "FAIL" in capsys.readouterr().out
