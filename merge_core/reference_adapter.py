"""The adapter as PEFT must see it to rebuild base + adapter under this transformers version.

An adapter trained under an older transformers names modules the way that version did (ViT's
``vit.encoder.layer.0.attention.attention.query``), and so does the base checkpoint, which is why
the merge finds its tensors. The model class of this transformers may call the same module
otherwise (``vit.layers.0.attention.q_proj``), and then PEFT finds none of the adapter's modules.
transformers' own checkpoint renaming (layouts.py) says what each checkpoint tensor is called in the
model; the reference gets a copy of the adapter with those names: the same tensors, and each module
with its own rank and alpha written out, since patterns written for the old names would not match.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .adapter import ADAPTER_CONFIG, normalize_key
from .layouts import model_names
from .plan import MergePlan

_PEFT_PREFIX = "base_model.model."


def adapter_for_model(plan: MergePlan, model: Any, workdir: Path) -> tuple[Path, str]:
    """The adapter folder PEFT can load onto ``model``, and a note for the table when it was renamed.

    The adapter's own folder when its module names exist in ``model`` (or when no renaming explains
    the difference: PEFT's error then says what is missing); otherwise a renamed copy in ``workdir``.
    """
    present = {name for name, _ in model.named_modules()}
    missing = sorted(m for m in plan.adapter.lora_modules if m not in present)
    if not missing:
        return plan.adapter.path, ""
    to_model = {ckpt: new for new, ckpt in model_names(plan.base.path, [f"{m}.weight" for m in missing]).items()}
    renamed = {m: to_model[f"{m}.weight"].removesuffix(".weight") for m in missing if f"{m}.weight" in to_model}
    if len(renamed) < len(missing) or any(name not in present for name in renamed.values()):
        return plan.adapter.path, ""
    _write_renamed(plan, renamed, workdir)
    first = missing[0]
    return workdir, f"adapter module names mapped to this transformers' layout for PEFT ({first} -> {renamed[first]})"


def _write_renamed(plan: MergePlan, renamed: dict[str, str], workdir: Path) -> None:
    from safetensors.torch import save_file

    config = json.loads((plan.adapter.path / ADAPTER_CONFIG).read_text())
    settings = plan.adapter_config
    modules = sorted(plan.adapter.lora_modules)
    names = {m: renamed.get(m, m) for m in modules}
    config.update(
        target_modules=[names[m] for m in modules],
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        # PEFT matches pattern keys as regexes against the end of a module name: exact names, escaped.
        rank_pattern={re.escape(names[m]): settings.rank_for(m) for m in modules},
        alpha_pattern={re.escape(names[m]): settings.alpha_for(m) for m in modules},
    )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    state = {_renamed_key(key, renamed): plan.adapter.tensor(key).contiguous() for key in plan.adapter.specs}
    save_file(state, workdir / "adapter_model.safetensors", metadata={"format": "pt"})


def _renamed_key(key: str, renamed: dict[str, str]) -> str:
    module = normalize_key(key)[0]
    prefix = _PEFT_PREFIX if key.startswith(_PEFT_PREFIX) else ""
    if module not in renamed or not key.startswith(prefix + module):
        return key
    return prefix + renamed[module] + key[len(prefix + module) :]


__all__ = ["adapter_for_model"]
