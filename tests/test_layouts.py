"""Adapters named after the model class's modules resolve to checkpoints saved in another layout.

transformers 5 saves some architectures under their original checkpoint names (Qwen2.5-VL:
``model.layers.*``) while its model class, and so every adapter trained with it, says
``model.language_model.layers.*``. The merge must follow transformers' own renaming, keep the
base's names in the output, and compute what PeftModel(base, adapter) computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_core import merge_adapter
from merge_core.layouts import model_names


def _qwen2_5_vl(path: Path) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]
    )
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    model.save_pretrained(path)
    return path


def _keys(folder: Path) -> list[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return _qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "base")


def test_transformers_renaming_is_read_without_weights(vlm: Path) -> None:
    names = model_names(vlm, _keys(vlm))
    assert names["model.language_model.layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"


def test_vlm_adapter_in_model_layout_merges_into_checkpoint_layout(vlm: Path, tmp: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)", init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp / "adapter")
    assert any("language_model.layers" in k for k in _keys_adapter(tmp / "adapter"))

    merge_adapter(vlm, tmp / "adapter", tmp / "merged")
    assert sorted(_keys(tmp / "merged")) == sorted(_keys(vlm))  # the base's layout is kept

    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, tmp / "adapter").eval()
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
        with reference.disable_adapter():
            plain = reference(input_ids=ids).logits
    assert float((want - plain).abs().max()) > 1e-3  # the adapter matters
    assert float((want - got).abs().max()) <= 1e-4


def _keys_adapter(folder: Path) -> list[str]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return list(f.keys())


def _nemotron_h(path: Path) -> Path:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    config = NemotronHConfig(
        vocab_size=96,
        hidden_size=32,
        layers_block_type=["attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mamba_num_heads=4,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=1,
        use_mamba_kernels=False,
    )
    NemotronHForCausalLM(config).save_pretrained(path)
    return path


def test_backbone_checkpoint_with_model_named_adapter(tmp: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import NemotronHForCausalLM

    base = _nemotron_h(tmp / "base")
    assert all(k.startswith(("backbone.", "lm_head.")) for k in _keys(base))
    model = NemotronHForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapter = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    )
    adapter.save_pretrained(tmp / "adapter")
    assert any(".model.layers." in k for k in _keys_adapter(tmp / "adapter"))

    merge_adapter(base, tmp / "adapter", tmp / "merged")
    assert sorted(_keys(tmp / "merged")) == sorted(_keys(base))
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    reference = PeftModel.from_pretrained(
        NemotronHForCausalLM.from_pretrained(base, dtype=torch.float32), tmp / "adapter"
    ).eval()
    merged = NemotronHForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((reference(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()) <= 1e-4


def test_embedding_rows_beyond_vocab_size_by_design_are_kept(tmp: Path) -> None:
    """Mllama keeps vocab_size + 8 embedding rows: a merge that does not resize must leave vocab_size alone."""
    import json

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[1],
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_global_layers=1,
        attention_heads=2,
        image_size=32,
        patch_size=16,
        vision_output_dim=32,
        intermediate_layers_indices=[0],
    )
    MllamaForConditionalGeneration(MllamaConfig(text_config=text, vision_config=vision)).save_pretrained(tmp / "base")
    model = MllamaForConditionalGeneration.from_pretrained(tmp / "base", dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(tmp / "adapter")

    report = merge_adapter(tmp / "base", tmp / "adapter", tmp / "merged")
    assert not any("vocab_size" in note for note in report.notes)
    assert json.loads((tmp / "merged" / "config.json").read_text())["text_config"]["vocab_size"] == 128
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    reference = PeftModel.from_pretrained(
        MllamaForConditionalGeneration.from_pretrained(tmp / "base", dtype=torch.float32), tmp / "adapter"
    ).eval()
    merged = MllamaForConditionalGeneration.from_pretrained(tmp / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((reference(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()) <= 1e-4
