"""Adapters of other libraries are refused in one sentence naming the format and the way out,
before any base tensor is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_core import merge_adapter
from merge_core.errors import UnsupportedAdapterError
from merge_core.formats import foreign_by_files
from tests.factories import make_base


def _kohya(folder: Path) -> None:
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        folder / "my_style.safetensors",
    )


def _diffusers(folder: Path) -> None:
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
        },
        folder / "pytorch_lora_weights.safetensors",
    )


def _mlx(folder: Path) -> None:
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}}
        )
    )
    save_file({"model.layers.0.self_attn.q_proj.lora_a": torch.zeros(32, 8)}, folder / "adapters.safetensors")


def _adapter_hub(folder: Path) -> None:
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "config": {"architecture": "lora", "r": 8},
                "model_type": "llama",
                "name": "x",
                "version": "adapters.1.1.0",
            }
        )
    )
    (folder / "pytorch_adapter.bin").write_bytes(b"not read")


def _gguf(folder: Path) -> None:
    (folder / "my-lora-f16.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")


def _peft_named_kohya(folder: Path) -> None:
    """A kohya file renamed to PEFT's file name, without a config: recognised by its tensor names."""
    _kohya(folder)
    (folder / "my_style.safetensors").rename(folder / "adapter_model.safetensors")


FORMATS = {
    "kohya": (_kohya, "diffusers/kohya image-model LoRA.*load_lora_weights"),
    "diffusers": (_diffusers, "diffusers/kohya image-model LoRA"),
    "mlx-lm": (_mlx, "mlx-lm adapter.*mlx_lm.fuse"),
    "adapter-transformers": (_adapter_hub, "AdapterHub.*merge_adapter"),
    "gguf": (_gguf, "GGUF adapter for llama.cpp.*llama-export-lora"),
    "kohya under a PEFT name": (_peft_named_kohya, "diffusers/kohya"),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "base")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_foreign_adapter_is_refused_by_name(fmt: str, base: Path, tmp: Path) -> None:
    make, match = FORMATS[fmt]
    folder = tmp / "adapter"
    folder.mkdir()
    make(folder)
    with pytest.raises(UnsupportedAdapterError, match=match) as info:
        merge_adapter(base, folder, tmp / "merged")
    assert "not a PEFT adapter" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp / "merged").exists()


def test_hub_file_lists_are_recognised_before_download() -> None:
    assert foreign_by_files(["README.md", "pytorch_lora_weights.safetensors"]) is not None
    assert foreign_by_files(["adapter_config.json", "adapter_model.safetensors"]) is None
    assert foreign_by_files(["config.json", "model.safetensors"]) is None  # a full model is not an adapter format
