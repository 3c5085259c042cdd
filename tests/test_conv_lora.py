"""LoRA and DoRA on convolutions (nn.Conv1d / Conv2d / Conv3d), merged as PEFT computes them.

Each case is a tiny transformers model with convolution layers, a LoRA saved by PEFT on those layers
(random non-zero B), a merge by merge_core, and two independent checks: the merged model's outputs
against PeftModel's unmerged forward, and each merged conv weight bit for bit against a float64
reference rounded once. Convolutions PEFT's LoRA branch cannot be merged into are refused before output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_core import MergeOptions, merge_adapter
from merge_core.errors import UnsupportedAdapterError
from merge_core.merge import execute_plan
from merge_core.plan import build_plan
from merge_core.verify import verify_merge
from tests.arch_models import vit
from tests.test_verify_tasks import whisper

R, ALPHA = 4, 8


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=3)
    return ResNetForImageClassification(config)


def videomae():
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    config = VideoMAEConfig(
        image_size=8,
        patch_size=4,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=3,
    )
    return VideoMAEForVideoClassification(config)


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(
        ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )


def autoformer():
    from transformers import AutoformerConfig, AutoformerForPrediction

    config = AutoformerConfig(
        prediction_length=4,
        context_length=8,
        lags_sequence=[1, 2],
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
    )
    return AutoformerForPrediction(config)


def whisper_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "input_features": torch.randn(2, 16, 64, generator=gen),
        "decoder_input_ids": torch.randint(3, 96, (2, 5), generator=gen),
    }


def image_inputs(size: int) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    return lambda gen: {"pixel_values": torch.randn(2, 3, size, size, generator=gen)}


def video_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 4, 3, 8, 8, generator=gen)}


@dataclass
class ConvCase:
    build: Callable[[], Any]
    targets: list[str]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    convs: int  # how many conv weights the adapter changes
    lora: dict[str, Any] = field(default_factory=dict)


CASES = {
    # Conv1d, kernel 3 (conv2 with stride 2), next to Linear targets, with lora_bias on the conv biases.
    "whisper-conv1d": ConvCase(whisper, ["conv1", "conv2", "q_proj"], whisper_inputs, 2, {"lora_bias": True}),
    "whisper-conv1d-dora": ConvCase(whisper, ["conv1", "conv2", "v_proj"], whisper_inputs, 2, {"use_dora": True}),
    # Conv2d patch embedding, kernel 4 = stride 4.
    "vit-conv2d": ConvCase(vit, ["projection", "query"], image_inputs(16), 1),
    "vit-conv2d-dora-rslora": ConvCase(
        vit, ["projection"], image_inputs(16), 1, {"use_dora": True, "use_rslora": True}
    ),
    # Conv2d 1x1 (PEFT's fast path), 3x3 and the 7x7 stem.
    "resnet-conv2d-1x1-3x3": ConvCase(resnet, ["convolution"], image_inputs(32), 9),
    # Conv3d tubelet embedding, kernel (2, 4, 4).
    "videomae-conv3d": ConvCase(videomae, ["projection"], video_inputs, 1),
}


def save_adapter(model: Any, base: Path, path: Path, case: ConvCase) -> None:
    """A LoRA with non-zero B (and DoRA magnitudes away from the weight norms), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    model.name_or_path = str(base)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=case.targets, init_lora_weights=False, **case.lora)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
            elif "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(path)


def saved(tmp: Path, case: ConvCase) -> tuple[Path, Path]:
    base, adapter = tmp / "base", tmp / "adapter"
    torch.manual_seed(0)
    model = case.build()
    model.save_pretrained(base)
    save_adapter(model, base, adapter, case)
    return base, adapter


def merged(tmp: Path, case: ConvCase) -> tuple[Path, Path, Path]:
    base, adapter = saved(tmp, case)
    merge_adapter(base, adapter, tmp / "merged", MergeOptions())
    return base, adapter, tmp / "merged"


def peft_model(model: Any, adapter: Path) -> Any:
    """PeftModel, unmerged. Whisper's encoder reads ``conv1.stride``, which PEFT's conv wrapper does not pass
    through (AttributeError in PEFT 0.21); the wrappers get their base layer's stride, the math stays PEFT's."""
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(model, adapter)
    for module in wrapped.modules():
        base_layer = getattr(module, "base_layer", None)
        if isinstance(base_layer, torch.nn.modules.conv._ConvNd):
            module.stride = base_layer.stride
    return wrapped


def outputs(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def conv_reference(base: dict, adapter: dict, module: str, *, scale: float, dora: bool) -> torch.Tensor:
    """W + scale * (B @ A).reshape(W.shape) in float64 (and DoRA's per-channel rescale), not yet rounded."""
    w = base[f"{module}.weight"].double()
    a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    exact = w + scale * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    if dora:
        magnitude = adapter[f"base_model.model.{module}.lora_magnitude_vector"].double().reshape(-1)
        norms = exact.flatten(1).norm(dim=1)
        exact = exact * (magnitude / norms).view(-1, *[1] * (w.dim() - 1))
    return exact


def bitwise_convs(base: Path, adapter: Path, out: Path, case: ConvCase) -> int:
    """Asserts each merged conv weight has the bits of its float64 reference rounded once; returns how many."""
    base_sd = load_file(base / "model.safetensors")
    adapter_sd = load_file(adapter / "adapter_model.safetensors")
    out_sd = load_file(out / "model.safetensors")
    modules = [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in adapter_sd if "lora_A" in k]
    convs = [m for m in modules if base_sd[f"{m}.weight"].dim() > 2]
    scale = ALPHA / R**0.5 if case.lora.get("use_rslora") else ALPHA / R
    for module in convs:
        exact = conv_reference(base_sd, adapter_sd, module, scale=scale, dora=bool(case.lora.get("use_dora")))
        written = out_sd[f"{module}.weight"]
        assert torch.equal(written, exact.to(written.dtype)), module
    return len(convs)


@pytest.mark.parametrize("name", list(CASES))
def test_conv_lora_merges_like_peft_model(tmp: Path, name: str) -> None:
    case = CASES[name]
    base, adapter, out = merged(tmp, case)
    model_class = type(case.build())
    inputs = case.inputs(torch.Generator().manual_seed(2))
    expected = outputs(peft_model(model_class.from_pretrained(base), adapter), inputs)
    got = outputs(model_class.from_pretrained(out), inputs)
    untouched = outputs(model_class.from_pretrained(base), inputs)
    assert (expected - untouched).abs().max() > 1e-2  # the conv adapter changes the output
    assert (got - expected).abs().max() < 1e-4

    assert bitwise_convs(base, adapter, out, case) == case.convs


@pytest.mark.parametrize("name", ["resnet-conv2d-1x1-3x3", "vit-conv2d-dora-rslora"])
def test_conv_lora_in_one_row_blocks_rounds_once_to_bfloat16_and_verifies(tmp: Path, name: str) -> None:
    """Row blocks of one output channel each: the streamed merge still equals the float64 reference bit for bit."""
    case, options = CASES[name], MergeOptions(dtype="bfloat16")
    (base, adapter), out = saved(tmp, case), tmp / "merged"
    execute_plan(build_plan(base, adapter, options), out, block_elements=16)
    assert bitwise_convs(base, adapter, out, case) == case.convs
    report = verify_merge(build_plan(base, adapter, options), out, functional="never", block_elements=16)
    assert report.passed, [(c.name, c.status, c.detail) for c in report.checks if c.passed is False]
    assert {m.bitwise_fraction for m in report.modules} == {1.0}


@pytest.mark.parametrize(
    ("build", "targets", "message"),
    [
        # ConvNext's depthwise conv (groups = channels): B @ A is a dense kernel the grouped weight cannot hold.
        (convnext, ["dwconv"], "groups=(8|16)"),
        # Autoformer's trend projection pads circularly; PEFT's lora_A pads with zeros.
        (autoformer, ["trend_projection"], "padding_mode 'circular'"),
    ],
)
def test_conv_lora_that_no_merged_weight_reproduces_is_refused_before_output(
    tmp: Path, build: Callable[[], Any], targets: list[str], message: str
) -> None:
    from peft import LoraConfig, get_peft_model

    base, adapter, out = tmp / "base", tmp / "adapter", tmp / "merged"
    torch.manual_seed(0)
    model = build()
    model.save_pretrained(base)
    model.name_or_path = str(base)
    # r = 16: PEFT itself needs the rank divisible by the groups of the depthwise convs (8 and 16 channels).
    get_peft_model(model, LoraConfig(r=16, target_modules=targets, init_lora_weights=False)).save_pretrained(adapter)
    with pytest.raises(UnsupportedAdapterError, match=message) as refused:
        merge_adapter(base, adapter, out, MergeOptions())
    assert "target_modules" in str(refused.value) and "\n" not in str(refused.value)
    assert not out.exists()


def test_conv_lora_on_a_model_class_not_built_here_merges_with_a_warning(tmp: Path) -> None:
    """Without the class, dilation and padding_mode are unknown: the merge says so instead of staying silent."""
    base, adapter = saved(tmp, CASES["vit-conv2d"])
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["SomeCustomVisionModel"]
    (base / "config.json").write_text(json.dumps(config))
    plan = build_plan(base, adapter, MergeOptions())
    assert [w for w in plan.warnings if "dilation and padding_mode" in w] == plan.warnings
    assert len(plan.warnings) == 1 and "PeftModel" in plan.warnings[0]
    assert build_plan(*saved(tmp / "known", CASES["vit-conv2d"]), MergeOptions()).warnings == []


def test_combining_conv_lora_adapters_is_refused_before_output(tmp: Path) -> None:
    from merge_core.combine import AdapterSource, UnsupportedCombinationError, combine_adapters

    base, first = saved(tmp, CASES["vit-conv2d"])
    second = tmp / "second"
    save_adapter(type(vit()).from_pretrained(base), base, second, CASES["vit-conv2d"])
    with pytest.raises(UnsupportedCombinationError, match="convolution"):
        combine_adapters([AdapterSource(first), AdapterSource(second)], "stack", tmp / "combined")
    assert not (tmp / "combined").exists()
