"""Every PEFT type the registry merges, end to end through merge_core: the merged model computes
what PeftModel(base, adapter) computes unmerged, and the verification table passes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from merge_core import MergeOptions, merge_adapter
from merge_core.plan import build_plan
from merge_core.verify import verify_merge
from tests.peft_types_cases import _randomize
from tests.test_peft_types import CASES, _configs

# Fused-expert cases need loaders beyond AutoModelForCausalLM's defaults to compare, and constrained OFT (coft)
# stays within eps of the identity, so its effect is below a float32 logits comparison; the registry's own tests
# compare their tensors with PEFT's merge_and_unload in float64.
END_TO_END = [c for c in CASES if "target-parameters" not in c and "coft" not in c]


def _build(folder: Path, name: str) -> tuple[Path, Path]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_config, peft_config = _configs()[name]
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(model_config)
        with torch.no_grad():
            for param_name, p in base.named_parameters():
                if param_name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
        base.save_pretrained(folder / "base")
        peft_model = get_peft_model(base, peft_config)
        _randomize(peft_model, torch.Generator().manual_seed(1))
        peft_model.save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("name", END_TO_END)
def test_merged_equals_peft_unmerged(name: str, tmp: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = _build(tmp, name)
    merge_adapter(base, adapter, tmp / "merged", MergeOptions(dtype="float32"))
    vocab = AutoModelForCausalLM.from_pretrained(base).config.vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        want = _logits(reference, ids)
        with reference.disable_adapter():
            plain = _logits(reference, ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp / "merged").eval(), ids)
    assert float((want - plain).abs().max()) > 1e-4, "the adapter must change the output"
    assert float((want - got).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", ["loha", "ia3", "vera-saved", "oft"])
def test_bfloat16_output_is_rounded_once_and_verified(name: str, tmp: Path) -> None:
    if name not in CASES:
        pytest.fail(f"case {name} is not in tests/test_peft_types.py any more: {CASES}")
    base, adapter = _build(tmp, name)
    merge_adapter(base, adapter, tmp / "merged", MergeOptions(dtype="bfloat16"))
    report = verify_merge(build_plan(base, adapter, MergeOptions(dtype="bfloat16")), tmp / "merged", functional="never")
    assert report.passed, report.to_text()
    assert report.check("merged = float64 reference rounded once").value.startswith("100.000000%")
