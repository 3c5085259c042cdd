"""The adapters being combined: loaded once, each with its weight, and the full tensors they ship."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import AdapterConfig, AdapterWeights, load_adapter_config, load_adapter_weights
from ..factors import read_factors
from .errors import CombinationArgumentError, IncompatibleAdaptersError

PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterSource:
    """One adapter folder to combine, its weight (negative subtracts, 0 leaves it out of a stack) and a name."""

    path: Path
    weight: float = 1.0
    name: str | None = None


@dataclass(frozen=True)
class Source:
    """One loaded adapter: its config, its tensors and its weight in the combination."""

    index: int
    name: str
    path: Path
    weight: float
    config: AdapterConfig
    tensors: AdapterWeights

    @property
    def max_rank(self) -> int:
        # PEFT: "the maximum possible rank", r or the largest rank_pattern value.
        pattern = self.config.rank_pattern
        return self.config.r if not pattern else max(self.config.r, *(int(v) for v in pattern.values()))

    @property
    def modules_to_save(self) -> list[str]:
        return [str(n) for n in (self.config.modules_to_save or [])]

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of ``module`` in float32, the dtype PEFT combines in."""
        return read_factors(self.tensors, self.tensors.lora_modules[module])

    def scale(self, module: str) -> float:
        return self.config.scale_for(module)


def load_sources(sources: Sequence[AdapterSource | Path], weights: Sequence[float] | None) -> list[Source]:
    """Every adapter loaded (config and tensor names), with unique names; ``weights`` overrides theirs."""
    if sources is None or len(sources) == 0:
        raise CombinationArgumentError("No adapters to combine: pass at least one adapter folder.")
    items = [s if isinstance(s, AdapterSource) else AdapterSource(Path(s)) for s in sources]
    weights = None if weights is None else list(weights)
    if weights is not None and len(weights) != len(items):
        raise CombinationArgumentError(
            f"Got {len(weights)} weight(s) for {len(items)} adapter(s); give exactly one weight per adapter."
        )
    out: list[Source] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        weight = _checked_weight(weights[i] if weights is not None else item.weight, i)
        path = Path(item.path)
        name = item.name or path.name or f"adapter{i + 1}"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        out.append(Source(i, name, path, weight, load_adapter_config(path), load_adapter_weights(path)))
    return out


def _checked_weight(value: object, index: int) -> float:
    try:
        weight = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise CombinationArgumentError(f"The weight of adapter {index + 1} is not a number: {value!r}.") from exc
    if not math.isfinite(weight):
        raise CombinationArgumentError(
            f"The weight of adapter {index + 1} is {weight}; weights must be finite numbers."
        )
    return weight


def same_path(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def names_overlap(a: str, b: str) -> bool:
    """PEFT matches modules_to_save names on the end of the module path."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _is_modules_to_save(source: Source, target: str) -> bool:
    module = target.rsplit(".", 1)[0]
    return any(names_overlap(module, n) for n in source.modules_to_save)


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape:
        return False
    if x.dtype == y.dtype:
        return torch.equal(x, y)
    common = torch.promote_types(x.dtype, y.dtype)
    return torch.equal(x.to(common), y.to(common))


def collect_replacements(
    sources: list[Source], *, keep_modules_to_save: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full tensors the sources ship (modules_to_save, saved embedding layers, trained biases), and those left out.

    Identical copies of one tensor (e.g. the unchanged base embedding PEFT saves next to an
    embedding LoRA) are kept once; two different values for one tensor are refused.
    """
    out: dict[str, torch.Tensor] = {}
    owners: dict[str, tuple[str, torch.Tensor]] = {}
    dropped: list[str] = []
    for s in sources:
        for target, key in s.tensors.replacements.items():
            if not keep_modules_to_save and _is_modules_to_save(s, target):
                dropped.append(f"{s.name}:{target}")
                continue
            # Kept in their stored dtype: a bf16 lm_head copy would only double in size as float32.
            value = s.tensors.tensor(key)
            if target in owners:
                other_name, other = owners[target]
                if _same_tensor(other, value):
                    continue
                raise IncompatibleAdaptersError(
                    f"Adapters {other_name!r} and {s.name!r} both ship a full copy of {target} (modules_to_save, a "
                    "resized embedding or a trained bias) with different values; one combined adapter cannot hold "
                    "both. Leave one of them out of the combination."
                )
            owners[target] = (s.name, value)
            out[key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key] = value.contiguous()
    return out, dropped
