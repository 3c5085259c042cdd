"""Tiny vision-language models, and their adapters as transformers 4 named them.

transformers 5 moved each VLM's text tower under ``model.language_model`` (and the vision tower under
``model.vision_tower``), yet saves checkpoints in the older layout (``language_model.model.layers``);
adapters trained before v5 name the old modules, those trained since the new ones. Both must merge
into the same checkpoint: ``as_transformers4`` rewrites a v5 adapter's keys into its v4 twin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.arch_models import DECODER, LLAMA_TARGETS, Arch

LANGUAGE_ONLY = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"  # the text tower
_SIGLIP = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
}


def gemma3_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**DECODER, "head_dim": 8, "sliding_window": 16}
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=100,
        boi_token_index=101,
        eoi_token_index=102,
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the projector at zero: the image would not reach the text
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return model


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {**DECODER, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    vision = {
        "depth": 1,
        "embed_dim": 16,
        "hidden_size": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 4,
        "spatial_merge_size": 1,
        "temporal_patch_size": 1,
    }
    return Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=120,
            video_token_id=121,
            vision_start_token_id=122,
            vision_end_token_id=123,
        )
    )


def llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = {"model_type": "llama", **DECODER}
    vision = {"model_type": "clip_vision_model", **_SIGLIP, "num_hidden_layers": 2, "projection_dim": 16}
    return LlavaForConditionalGeneration(
        LlavaConfig(text_config=text, vision_config=vision, image_token_index=100, vision_feature_layer=-1)
    )


def paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = {"model_type": "gemma", **DECODER, "head_dim": 8}
    vision = {"model_type": "siglip_vision_model", **_SIGLIP, "projection_dim": 32}
    return PaliGemmaForConditionalGeneration(
        PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=100, projection_dim=32)
    )


def idefics3():  # SmolVLM's architecture; its text tower is model.text_model
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    text = {"model_type": "llama", **DECODER}
    return Idefics3ForConditionalGeneration(
        Idefics3Config(text_config=text, vision_config=_SIGLIP, image_token_id=100, scale_factor=2)
    )


VLM_ARCHS: dict[str, Arch] = {
    "gemma3-multimodal": Arch(gemma3_multimodal, LANGUAGE_ONLY, kind="vlm", group="vlm"),
    # The plain list, as many published Gemma 3 adapters have it, also adapts the SigLIP tower's q/k/v.
    "gemma3-multimodal-all-towers": Arch(gemma3_multimodal, LLAMA_TARGETS, kind="image-text", group="vlm"),
    "qwen2-vl": Arch(qwen2_vl, LANGUAGE_ONLY, kind="vlm", group="vlm"),
    "llava": Arch(llava, LLAMA_TARGETS, kind="vlm", group="vlm"),
    "paligemma": Arch(paligemma, LLAMA_TARGETS, kind="vlm", group="vlm"),
    "idefics3": Arch(idefics3, LLAMA_TARGETS, kind="vlm", group="vlm"),
}

# How transformers 4 named the modules that transformers 5 moved (model-class names, after base_model.model.).
V4_NAMES = {
    "gemma3-multimodal-all-towers": {
        "model.language_model.": "language_model.model.",
        "model.vision_tower.": "vision_tower.",
    },
    "llava": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower."},
    "paligemma": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower."},
    "qwen2-vl": {"model.language_model.": "model."},
}


def as_transformers4(adapter: Path, path: Path, renames: dict[str, str]) -> Path:
    """The same adapter, its keys named as transformers 4 named the modules (and a target list, not a regex)."""
    import json

    shutil.copytree(adapter, path)
    prefix = "base_model.model."
    state: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(adapter / "adapter_model.safetensors").items():
        name = key.removeprefix(prefix)
        old = next((o for o in renames if name.startswith(o)), None)
        state[prefix + (renames[old] + name.removeprefix(old) if old else name)] = tensor
    if list(state) == list(load_file(adapter / "adapter_model.safetensors")):
        raise ValueError(f"no key of {adapter} starts with any of {list(renames)}")
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "adapter_config.json").read_text())
    if isinstance(config["target_modules"], str):  # a v5 regex on language_model would match no v4 name
        config["target_modules"] = LLAMA_TARGETS
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path
