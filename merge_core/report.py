"""What a merge did, as data: shown as a table by the app and as text/JSON by the CLI."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .plan_types import ModulePlan

# What the report says about each changed module is exactly what the plan decided about it.
ModuleReport = ModulePlan


@dataclass
class MergeReport:
    base: str
    adapter: str
    adapter_revision: str | None
    output_dir: str
    base_dtype: str
    output_dtype: str
    compute_dtype: str
    device: str
    modules: list[ModuleReport]
    changed_tensors: list[str]
    copied_tensors: int
    shards: list[str]
    base_bytes: int
    adapter_bytes: int
    output_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config_changes: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] = field(default_factory=dict)
    # How several adapters were combined into the merged one (empty for a single adapter).
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        return sorted({m.variant for m in self.modules})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def summary(self) -> str:
        gb = 1e9
        lines = [
            f"Merged {len(self.modules)} module(s) of {self.adapter} into {self.base}",
            f"  variants: {', '.join(self.variants) or '-'}; output dtype {self.output_dtype} "
            f"(computed in {self.compute_dtype} on {self.device})",
            f"  {len(self.changed_tensors)} tensor(s) changed, {self.copied_tensors} copied bit-identically",
            f"  sizes: base {self.base_bytes / gb:.3f} GB, adapter {self.adapter_bytes / 1e6:.1f} MB, "
            f"merged {self.output_bytes / gb:.3f} GB in {len(self.shards)} shard(s)",
            "  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()),
            f"  output: {self.output_dir}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)
