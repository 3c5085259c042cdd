"""The pipeline shared by app and CLI, on local folders: one adapter, several adapters, model checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from merge_core.generate import GenerationSettings
from merge_core.pipeline import MergeRequest, add_model_checks, model_checks, parse_adapter_list, run_merge
from tests.factories import load_model, logits, make_adapter, make_base, make_tokenizer, prompt_ids


def test_parse_adapter_list() -> None:
    assert parse_adapter_list("a/b, c/d:0.5\n./x/y:2") == [("a/b", 1.0), ("c/d", 0.5), ("./x/y", 2.0)]
    assert parse_adapter_list("owner/name/sub@v1") == [("owner/name/sub@v1", 1.0)]


def test_single_adapter_with_model_checks_and_card(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    make_tokenizer(base)
    adapter = make_adapter(base, tmp / "my-lora", target_modules=["q_proj", "v_proj"])
    result = run_merge(MergeRequest(adapter=str(adapter)), tmp / "work")
    assert result.inputs.suggested_name == "my-merged"
    checks = model_checks(
        result.base_dir,
        result.adapter_dir,
        result.output_dir,
        GenerationSettings("w5 w6 w7", max_new_tokens=6),
        functional="always",
    )
    add_model_checks(result, checks)
    assert result.verification.passed, result.verification.to_text()
    assert {c.group for c in result.verification.checks} == {"structure", "numerics", "function"}
    sample = checks.sample
    assert sample is not None and sample.merged_equals_adapter and sample.base != sample.adapter
    card = (result.output_dir / "README.md").read_text()
    assert "base_model_relation: finetune" in card and "logits max abs diff" in card


def test_stack_of_two_adapters_equals_peft_with_both_active(tmp: Path) -> None:
    from peft import PeftModel

    base = make_base(tmp / "base", "llama")
    a1 = make_adapter(base, tmp / "a1", seed=1, target_modules=["q_proj", "v_proj"])
    a2 = make_adapter(base, tmp / "a2", seed=2, r=2, target_modules=["v_proj", "down_proj"])
    result = run_merge(MergeRequest(adapter=f"{a1}, {a2}"), tmp / "work")
    assert result.verification.passed
    assert "stack(" in result.inputs.adapter_id
    recipe = json.loads((result.adapter_dir / "merge_recipe.json").read_text())
    assert recipe["combination_type"] == "stack" and recipe["weights"] == [1.0, 1.0]

    model = PeftModel.from_pretrained(load_model(base), a1, adapter_name="one")
    model.load_adapter(a2, adapter_name="two")
    model.base_model.set_adapter(["one", "two"])
    ids = prompt_ids()
    ref = logits(model.eval(), ids)
    got = logits(load_model(result.output_dir), ids)
    assert (ref - got).abs().max().item() <= 1e-4
    only_one = logits(PeftModel.from_pretrained(load_model(base), a1).eval(), ids)
    assert (only_one - got).abs().max().item() > 1e-3  # the second adapter really counts


def test_cli_with_two_weighted_adapters_leaves_no_temporary_folder(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    a1 = make_adapter(base, tmp / "a1", seed=1, target_modules=["q_proj"])
    a2 = make_adapter(base, tmp / "a2", seed=2, target_modules=["q_proj"])
    out = tmp / "out"
    out.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "merge_core",
            str(base),
            f"{a1}:0.7,{a2}:0.3",
            str(out / "merged"),
            "--quiet",
            "--verify",
            "--functional",
            "always",
            "--combine",
            "linear",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "verification: PASSED" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["merged"]
    card = (out / "merged" / "README.md").read_text()
    assert "linear(" in card
    assert torch.isfinite(logits(load_model(out / "merged"), prompt_ids())).all()


def test_local_roots_refuse_folders_outside(tmp: Path) -> None:
    import pytest

    base = make_base(tmp / "allowed" / "base", "llama")
    adapter = make_adapter(base, tmp / "outside" / "adapter", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="not allowed"):
        run_merge(MergeRequest(adapter=str(adapter), base=str(base), local_roots=[tmp / "allowed"]), tmp / "w1")
    inside = make_adapter(base, tmp / "allowed" / "adapter", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="not allowed"):
        run_merge(
            MergeRequest(adapter=str(inside), base=str(tmp / "outside" / "adapter"), local_roots=[tmp / "allowed"]),
            tmp / "w2",
        )
    assert run_merge(
        MergeRequest(adapter=str(inside), base=str(base), local_roots=[tmp / "allowed"]), tmp / "w3"
    ).verification.passed


def test_model_checks_use_the_merged_dtype(tmp: Path) -> None:
    base = make_base(tmp / "base", "llama")
    make_tokenizer(base)
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj", "v_proj"])
    result = run_merge(MergeRequest(adapter=str(adapter), dtype="bfloat16"), tmp / "work")
    checks = model_checks(result.base_dir, result.adapter_dir, result.output_dir, None, functional="always")
    limit = next(c for c in checks.checks if c.name == "logits max abs diff vs PeftModel")
    assert (
        limit.passed
        and "16-bit" in next(c for c in checks.checks if c.name == "greedy continuation identical").threshold
    )


def test_adapter_declaring_a_foreign_local_base_gets_a_clear_message(tmp: Path) -> None:
    import pytest

    base = make_base(tmp / "base", "llama")
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/content/drive/MyDrive/llama-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names '/content/drive/MyDrive/llama-base' as its base model.*Hub ID"):
        run_merge(MergeRequest(adapter=str(adapter)), tmp / "work")
    # an explicit base still works
    assert run_merge(MergeRequest(adapter=str(adapter), base=str(base)), tmp / "work2").verification.passed
