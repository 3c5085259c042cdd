"""LoRA on fused expert parameters merged into checkpoints that store one tensor per expert.

transformers 5 saves Qwen3-MoE and Mixtral one 2-D tensor per expert and fuses them on load; PEFT 0.21 turns
expert targets into ``target_parameters`` on the fused ``gate_up_proj`` / ``down_proj``. The merge writes each
expert's slice of the fused delta into the per-expert tensors; the reference is PEFT itself.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from merge_core import MergeOptions, merge_adapter
from merge_core.experts import expert_layout
from merge_core.plan import build_plan
from merge_core.verify import verify_merge

TINY = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _qwen3_moe(experts: int = 4) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **TINY,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=experts,
        num_experts_per_tok=2,
        head_dim=8,
        architectures=["Qwen3MoeForCausalLM"],
    )


def _mixtral(experts: int = 4) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        **TINY,
        intermediate_size=16,
        num_local_experts=experts,
        num_experts_per_tok=2,
        architectures=["MixtralForCausalLM"],
    )


CASES: dict[str, tuple[Callable[[], Any], list[str] | str]] = {
    "qwen3-moe": (_qwen3_moe, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen3-moe-all-linear": (_qwen3_moe, "all-linear"),
    "mixtral": (_mixtral, ["q_proj", "v_proj", "w1", "w2", "w3"]),
}


@dataclass(frozen=True)
class Case:
    base: Path
    adapter: Path


def _randomize(model: Any) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _build(folder: Path, name: str) -> Case:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config, targets = CASES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config()).eval()
    model.save_pretrained(folder / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    _randomize(peft_model)
    peft_model.save_pretrained(folder / "adapter")
    return Case(folder / "base", folder / "adapter")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Case]:
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = _build(tmp_path_factory.mktemp(name), name)
        return cache[name]

    return get


def _names(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


def _logits(model: Any) -> torch.Tensor:
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_targets_fused_experts_of_a_per_expert_checkpoint(name: str, built: Callable[[str], Case]) -> None:
    case = built(name)
    config = json.loads((case.adapter / "adapter_config.json").read_text())
    assert {"gate_up_proj", "down_proj"} <= set(config["target_parameters"])
    names = _names(case.base)
    assert not any(n.endswith((".gate_up_proj", ".down_proj")) for n in names)  # only per-expert tensors on disk
    assert any(".experts.3." in n for n in names)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_merge_equals_peft_unmerged(name: str, built: Callable[[str], Case], tmp: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case = built(name)
    report = merge_adapter(case.base, case.adapter, tmp / "merged", MergeOptions(dtype="float32"))
    assert _names(tmp / "merged") == _names(case.base)  # the merged checkpoint keeps the per-expert layout
    assert any("per-expert tensors" in m.variant for m in report.modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case.base), case.adapter).eval()
        merged = AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()
    want, got = _logits(reference), _logits(merged)
    with reference.disable_adapter():
        plain = _logits(reference)
    effect, error = float((want - plain).abs().max()), float((want - got).abs().max())
    assert effect > 1e-3, f"the adapter must change the output (max change {effect:.2e})"
    assert error <= 1e-4, f"merged differs from PeftModel by {error:.2e} (the adapter changes it by {effect:.2e})"


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_every_expert_weight_equals_peft_merge_in_float64(name: str, built: Callable[[str], Case], tmp: Path) -> None:
    """Each fused parameter transformers rebuilds from the merged per-expert tensors is PEFT's float64 merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case = built(name)
    merge_adapter(case.base, case.adapter, tmp / "merged", MergeOptions(dtype="float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(case.base, dtype=torch.float64)
        want = PeftModel.from_pretrained(base, case.adapter).merge_and_unload().state_dict()
        got = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32).state_dict()
    fused = [k for k in want if k.endswith((".gate_up_proj", ".down_proj"))]
    assert len(fused) == 4
    for key in fused:
        # float64 merges whose sums differ in order agree to far below one float32 step
        torch.testing.assert_close(got[key].double(), want[key].float().double(), rtol=0, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_bfloat16_merge_is_rounded_once(name: str, built: Callable[[str], Case], tmp: Path) -> None:
    case = built(name)
    options = MergeOptions(dtype="bfloat16")
    merge_adapter(case.base, case.adapter, tmp / "merged", options)
    report = verify_merge(build_plan(case.base, case.adapter, options), tmp / "merged", functional="never")
    assert report.passed, report.to_text()
    assert report.check("merged = float64 reference rounded once").value.startswith("100.000000%")


def test_layout_follows_transformers_conversion_order(tmp: Path) -> None:
    """Experts in transformers' natural order (10 after 9), gate rows before up rows, as its Concatenate has it."""
    config = _qwen3_moe(experts=12)
    config.save_pretrained(tmp)
    inter, hidden = config.moe_intermediate_size, config.hidden_size
    prefix = "model.layers.1.mlp.experts"
    shapes = {}
    for e in range(12):
        shapes |= {f"{prefix}.{e}.gate_proj.weight": (inter, hidden), f"{prefix}.{e}.up_proj.weight": (inter, hidden)}
        shapes[f"{prefix}.{e}.down_proj.weight"] = (hidden, inter)
    layout = expert_layout(tmp, shapes, [prefix])
    assert layout.parameter_order[prefix] == ("gate_up_proj", "down_proj")
    gate_up, down = layout.fused[f"{prefix}.gate_up_proj"], layout.fused[f"{prefix}.down_proj"]
    assert (gate_up.shape, down.shape, gate_up.problem) == ((12, 2 * inter, hidden), (12, hidden, inter), "")
    assert [(p.tensor, p.expert, p.axis, p.start, p.stop) for p in gate_up.parts] == [
        (f"{prefix}.{e}.gate_proj.weight", e, 0, 0, inter) for e in range(12)
    ] + [(f"{prefix}.{e}.up_proj.weight", e, 0, inter, 2 * inter) for e in range(12)]
    assert [p.tensor for p in down.parts] == [f"{prefix}.{e}.down_proj.weight" for e in range(12)]
