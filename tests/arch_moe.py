"""Mixture-of-experts adapters as transformers 4 trained them: one LoRA per expert, on the v4 module names.

transformers 5 fuses each layer's experts into stacked parameters in the model class, yet saves
checkpoints under the v4 per-expert names (``experts.3.w1.weight``), so the adapters published for
Mixtral or Qwen-MoE before v5 name the same modules as the checkpoint. PEFT 0.21 converts them to
``target_parameters`` on the fused experts when it loads them; the merge must compute the same.
get_peft_model cannot build such an adapter on a v5 model, so its tensors are written here with the
key layout PEFT 4-era saves (``base_model.model.<module>.lora_A.weight``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def legacy_moe_adapter(base: Path, path: Path, targets: list[str], *, rank: int = 4, seed: int = 1) -> Path:
    """A LoRA on every 2-D base tensor whose module's last name is in ``targets`` (experts one by one)."""
    from peft import LoraConfig

    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    with safe_open(base / "model.safetensors", "pt") as f:
        for key in sorted(f.keys()):
            module = key.removesuffix(".weight")
            shape = f.get_slice(key).get_shape()
            if module == key or module.rsplit(".", 1)[-1] not in targets or len(shape) != 2:
                continue
            out_features, in_features = shape
            state[f"base_model.model.{module}.lora_A.weight"] = 0.1 * torch.randn(rank, in_features, generator=g)
            state[f"base_model.model.{module}.lora_B.weight"] = 0.1 * torch.randn(out_features, rank, generator=g)
    if not state:
        raise ValueError(f"no tensor of {base} is named after {targets}")
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=str(base)
    )
    config.save_pretrained(path)
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path
