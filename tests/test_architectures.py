"""Architecture coverage: a LoRA with each family's usual targets, merged, computes what PeftModel computes.

For every architecture of tests/arch_models.py a tiny random model of the task's own class is saved as
the base and a PEFT LoRA (init_lora_weights=False, weights made large enough to matter) as the adapter.
The float32 merge must reproduce PeftModel(base, adapter) unmerged within 1e-4 and the same greedy
tokens; a bfloat16 merge per family must be the float64 reference rounded once, bit for bit.
Adapters saved before transformers 5 are covered too: mixture-of-experts adapters with one LoRA per
expert (compared with PEFT's conversion to the fused expert parameters) and VLM adapters on the
old module names (compared with their transformers 5 twin).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from merge_core import MergeOptions, merge_adapter
from merge_core.plan import build_plan
from merge_core.verify import verify_merge
from tests.arch_models import ARCHS as TEXT_ARCHS
from tests.arch_models import Arch, generation_inputs, inputs
from tests.arch_moe import legacy_moe_adapter
from tests.arch_more import MORE_ARCHS
from tests.arch_vlm import V4_NAMES, VLM_ARCHS, as_transformers4

ARCHS = {**TEXT_ARCHS, **VLM_ARCHS, **MORE_ARCHS}

BF16_PER_GROUP = {arch.group: name for name, arch in reversed(ARCHS.items())}  # the first of each group


@dataclass(frozen=True)
class Built:
    base: Path
    adapter: Path
    model_class: type


def _save_adapter(model: Any, base: Path, path: Path, arch: Arch) -> None:
    from peft import LoraConfig, get_peft_model

    model.name_or_path = str(base)  # PEFT records it as the adapter's base_model_name_or_path
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=arch.targets, task_type=arch.task_type, init_lora_weights=False, **arch.lora
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(path)


def _build(folder: Path, name: str) -> Built:
    arch = ARCHS[name]
    torch.manual_seed(0)
    model = arch.build().eval()
    model.save_pretrained(folder / "base")
    _save_adapter(model, folder / "base", folder / "adapter", arch)
    return Built(folder / "base", folder / "adapter", type(model))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Built]]:
    """Each base and adapter once per module: the float32 and the bfloat16 test share them."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = _build(tmp_path_factory.mktemp(name), name)
        return cache[name]

    yield get


def _main_output(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).double()  # feature extractors: the features


@torch.no_grad()
def _greedy(model: Any, kind: str) -> torch.Tensor | None:
    feed = generation_inputs(kind, model)
    if feed is None:
        return None
    return model.generate(**feed, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)


def _assert_merge_equals_peft(model_class: type, base: Path, adapter: Path, merged_dir: Path, kind: str) -> Any:
    """The merged model's outputs and greedy tokens are PeftModel(base, adapter)'s; returns that PeftModel."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(model_class.from_pretrained(base), adapter).eval()
        merged = model_class.from_pretrained(merged_dir).eval()
        feed = inputs(kind, merged)
        with torch.no_grad():
            want, got = _main_output(reference(**feed)), _main_output(merged(**feed))
            with reference.disable_adapter():
                plain = _main_output(reference(**feed))
        effect, error = float((want - plain).abs().max()), float((want - got).abs().max())
        assert effect > 1e-3, f"the adapter must change the output (max change {effect:.2e})"
        assert error <= 1e-4, f"merged differs from PeftModel by {error:.2e} (the adapter changes it by {effect:.2e})"
        tokens = _greedy(reference, kind)
        if tokens is not None:
            assert torch.equal(tokens, _greedy(merged, kind)), "greedy tokens differ"
    return reference


@pytest.mark.parametrize("name", list(ARCHS))
def test_float32_merge_equals_peft_unmerged(name: str, built: Callable[[str], Built], tmp: Path) -> None:
    case = built(name)
    merge_adapter(case.base, case.adapter, tmp / "merged", MergeOptions(dtype="float32"))
    _assert_merge_equals_peft(case.model_class, case.base, case.adapter, tmp / "merged", ARCHS[name].kind)


LEGACY_MOE = {
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate"],
    "qwen3-moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("name", list(LEGACY_MOE))
def test_transformers4_expert_adapter_merges_like_peft_converts_it(
    name: str, built: Callable[[str], Built], tmp: Path
) -> None:
    case = built(name)
    adapter = legacy_moe_adapter(case.base, tmp / "adapter", LEGACY_MOE[name])
    merge_adapter(case.base, adapter, tmp / "merged", MergeOptions(dtype="float32"))
    reference = _assert_merge_equals_peft(case.model_class, case.base, adapter, tmp / "merged", "causal")
    # PEFT really took the fused-experts path: the per-expert LoRAs became target_parameters.
    assert {"gate_up_proj", "down_proj"} <= set(reference.peft_config["default"].target_parameters)
    _assert_bfloat16_rounded_once(case.base, adapter, tmp / "merged-bf16")


@pytest.mark.parametrize("name", list(V4_NAMES))
def test_transformers4_vlm_adapter_merges_like_its_transformers5_twin(
    name: str, built: Callable[[str], Built], tmp: Path
) -> None:
    case = built(name)
    adapter = as_transformers4(case.adapter, tmp / "adapter-v4", V4_NAMES[name])
    merge_adapter(case.base, adapter, tmp / "merged", MergeOptions(dtype="float32"))
    # PEFT 0.21 does not rename every v4 VLM key when it loads, so the reference is the v5-named twin.
    _assert_merge_equals_peft(case.model_class, case.base, case.adapter, tmp / "merged", ARCHS[name].kind)


def _assert_bfloat16_rounded_once(base: Path, adapter: Path, merged_dir: Path) -> None:
    options = MergeOptions(dtype="bfloat16")
    merge_adapter(base, adapter, merged_dir, options)
    report = verify_merge(build_plan(base, adapter, options), merged_dir, functional="never")
    assert report.passed, report.to_text()
    assert report.check("merged = float64 reference rounded once").value.startswith("100.000000%")


@pytest.mark.parametrize("name", sorted(BF16_PER_GROUP.values()))
def test_bfloat16_merge_is_rounded_once(name: str, built: Callable[[str], Built], tmp: Path) -> None:
    case = built(name)
    _assert_bfloat16_rounded_once(case.base, case.adapter, tmp / "merged")
