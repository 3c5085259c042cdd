"""Reading PEFT LoRA adapters: adapter_config.json and the names of the weight tensors."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config_checks import ADAPTER_CONFIG, check_config_regexes, check_config_types, shown
from .errors import AdapterConfigError, AdapterWeightsError, NonFiniteAdapterWeightsError, explain_os_error
from .json_files import JsonFormatError, read_json_file
from .peft_keys import PEFT_PREFIX, check_peft_keys, is_wrapper_copy
from .safetensors_io import SafetensorsFormatError, SafetensorsHeader, read_header, read_tensor

ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
# Which PEFT types and LoRA variants merge, and why the others do not, is merge_core.peft_types'
# registry: one record per type.


@dataclass
class AdapterConfig:
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = None
    ensure_weight_tying: bool = False
    raw: dict[str, Any] = field(default_factory=dict)

    def _pattern_value(self, pattern: dict[str, Any], module: str) -> Any:
        # PEFT's get_pattern_key: the first key that matches the end of the module name, as a regex.
        for key in pattern:
            if re.match(rf"(.*\.)?({key})$", module):
                return pattern[key]
        return None

    def rank_for(self, module: str) -> int:
        value = self._pattern_value(self.rank_pattern, module)
        return int(value) if value is not None else self.r

    def alpha_for(self, module: str) -> float:
        value = self._pattern_value(self.alpha_pattern, module)
        return float(value) if value is not None else self.lora_alpha

    def scale_for(self, module: str) -> float:
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def parse_adapter_config(data: dict[str, Any], source: str = ADAPTER_CONFIG) -> AdapterConfig:
    peft_type = data.get("peft_type")
    if not peft_type:
        raise AdapterConfigError(
            f"{source} has no peft_type, so it is not a PEFT adapter config; save the adapter with PEFT's "
            "save_pretrained."
        )
    if not isinstance(peft_type, str) or peft_type != peft_type.upper():  # PEFT looks the type up as written
        what = "a string" if not isinstance(peft_type, str) else "in capitals, as PEFT reads it,"
        raise AdapterConfigError(f'{source}: peft_type is {shown(peft_type)} but must be {what} such as "LORA".')
    from .peft_types import record_for

    record = record_for(peft_type)  # refuses, by name and with PEFT's reason, every type this tool does not merge
    check_config_types(data, source)
    check_config_regexes(data, source)
    record.check_config(Path(source).name, data)  # options no module could merge, before any module is resolved
    return AdapterConfig(
        peft_type=peft_type,
        r=data.get("r", 8),
        lora_alpha=float(data.get("lora_alpha", 8)),
        use_rslora=bool(data.get("use_rslora", False)),
        use_dora=bool(data.get("use_dora", False)),
        fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
        lora_bias=bool(data.get("lora_bias", False)),
        rank_pattern=dict(data.get("rank_pattern") or {}),
        alpha_pattern={k: float(v) for k, v in (data.get("alpha_pattern") or {}).items()},
        modules_to_save=list(data.get("modules_to_save") or []),
        target_modules=data.get("target_modules"),
        exclude_modules=data.get("exclude_modules"),
        layers_to_transform=data.get("layers_to_transform"),
        layers_pattern=data.get("layers_pattern"),
        base_model_name_or_path=data.get("base_model_name_or_path"),
        revision=data.get("revision"),
        task_type=data.get("task_type"),
        ensure_weight_tying=bool(data.get("ensure_weight_tying", False)),
        raw=dict(data),
    )


def local_adapter_subfolders(path: Path) -> list[str]:
    """The folder's direct subfolders that hold an adapter (PEFT's multi-adapter layout), sorted."""
    return sorted(p.name for p in path.iterdir() if (p / ADAPTER_CONFIG).is_file())


def load_adapter_config(path: str | Path) -> AdapterConfig:
    path = Path(path)
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        hint = " Point the adapter at the folder that holds it and the adapter's weights."
        if path.is_dir():
            subdirs = local_adapter_subfolders(path)
            if subdirs:
                hint = f" It has adapters in subfolders: {', '.join(subdirs)}; pick one of them."
            elif (path / "config.json").is_file():
                hint = " It looks like a full model, not a LoRA adapter: did you swap base and adapter?"
        raise AdapterConfigError(f"No {ADAPTER_CONFIG} in {path}.{hint}")
    try:
        data = read_json_file(config_path)
    except JsonFormatError as exc:
        raise AdapterConfigError(
            f"{config_path} cannot be read: {exc}; correct the file or save the adapter again with PEFT."
        ) from None
    except OSError as exc:
        raise AdapterConfigError(explain_os_error(exc, "read", config_path)) from exc
    if not isinstance(data, dict):
        raise AdapterConfigError(
            f"{config_path} is not a JSON object; correct the file or save the adapter again with PEFT."
        )
    return parse_adapter_config(data, str(config_path))


# --- weights -----------------------------------------------------------------------------------

_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class AdapterTensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class LoraModule:
    """The LoRA tensors of one base module, keyed by their normalized role (adapter keys as values)."""

    module: str
    a: str
    b: str
    magnitude: str | None = None
    b_bias: str | None = None
    is_embedding: bool = False


@dataclass
class AdapterWeights:
    """Adapter tensor names and shapes, and lazy access to their values."""

    path: Path
    file: Path
    specs: dict[str, AdapterTensorSpec]
    lora_modules: dict[str, LoraModule]
    # Full tensors that replace a base tensor: modules_to_save and saved (resized) embedding layers.
    replacements: dict[str, str]  # base-side tensor name ("lm_head.weight") -> adapter key
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _header: SafetensorsHeader | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.file.stat().st_size

    def tensor(self, key: str) -> torch.Tensor:
        if key in self._cache:
            return self._cache[key]
        if self.file.suffix == ".safetensors":
            if self._header is None:
                self._header = read_header(self.file)
            return read_tensor(self.file, self._header.tensors[key])
        return self._load_pickle()[key]

    def _load_pickle(self) -> dict[str, torch.Tensor]:
        if not self._cache:
            self._cache.update(load_pickle_state_dict(self.file))
        return self._cache

    def check_finite(self) -> None:
        """NaN/Inf in an adapter would silently poison the merged model: refuse up front.

        On the merge's thread count, with the bit test: hundreds of small parallel ``isfinite`` calls took 15 s
        on a busy 2-core machine (each waiting for a descheduled pool thread), 0.1 s this way."""
        from .tensor_math import Workspace, all_finite
        from .threads import merge_threads

        workspace = Workspace()
        with merge_threads(torch.device("cpu")):
            for key in self.specs:
                value = self.tensor(key)
                if value.is_floating_point() and not all_finite(value.contiguous(), workspace):
                    bad = int((~torch.isfinite(value.float())).sum())
                    raise NonFiniteAdapterWeightsError(
                        f"The adapter tensor {key} contains {bad} NaN/Inf value(s); training probably "
                        "diverged. Use an earlier checkpoint of the adapter."
                    )


def _torch_load(file: Path) -> Any:
    # mmap needs the zip format of torch.save; PEFT also reads the legacy one (torch.load, weights_only=True).
    import zipfile

    return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))


def load_pickle_state_dict(file: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: the unpickler only rebuilds tensors and containers, never runs code. torch maps only its
    # zip format; a legacy (pre-1.6 format) file, which PEFT loads too, is read whole: adapters are small.
    try:
        state = _torch_load(file)
    except Exception as exc:
        # torch's own text runs over several lines of advice on weights_only=False, which is never taken here.
        raise AdapterWeightsError(
            f"{file} is not a PyTorch weights file that loads safely with weights_only=True, and this tool "
            "never executes pickled code; convert the adapter to safetensors with PEFT's save_pretrained."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterWeightsError(
            f"{file} is not a flat dict of tensors, so it is not a PEFT adapter file; save the adapter again with PEFT."
        )
    return state


def normalize_key(key: str) -> tuple[str, str | None, str | None]:
    """Split an adapter key into (module path, LoRA part or None, parameter or None).

    Accepts the forms PEFT has written over the years: with or without the
    ``base_model.model.`` prefix, with or without an adapter-name infix (``.default``).
    """
    key = key.removeprefix(PEFT_PREFIX)
    parts = key.split(".")
    for i, token in enumerate(parts):
        if token in _LORA_PARTS and i > 0:
            rest = parts[i + 1 :]
            param: str | None = None
            if rest and rest[-1] in ("weight", "bias"):
                param = rest[-1]
                rest = rest[:-1]
            if len(rest) > 1:
                break  # not a shape we know; treated as a plain tensor below
            return ".".join(parts[:i]), token, param
    # modules_to_save copies are saved either under the original name or with an infix.
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        # ".modules_to_save.default.weight" (adapter-name infix) or ".modules_to_save.weight"
        drop = 2 if len(parts) - i > 2 else 1
        key = ".".join(parts[:i] + parts[i + drop :])
    return key, None, None


def _read_specs(file: Path) -> dict[str, AdapterTensorSpec]:
    if file.suffix == ".safetensors":
        try:
            header = read_header(file)
        except SafetensorsFormatError as exc:
            raise AdapterWeightsError(
                f"The adapter weights {file} are corrupt ({exc}); download the adapter again or save it "
                "again with PEFT."
            ) from exc
        return {k: AdapterTensorSpec(k, t.shape, t.torch_dtype) for k, t in header.tensors.items()}
    state = load_pickle_state_dict(file)
    return {k: AdapterTensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()}


def _role(part: str, param: str | None) -> str | None:
    """The LoraModule field an adapter tensor fills; None for a lora_A bias, which PEFT never has."""
    if part == "lora_magnitude_vector":
        return "magnitude"
    if part in ("lora_B", "lora_embedding_B"):
        return "b_bias" if param == "bias" else "b"
    return None if param == "bias" else "a"


def _lora_module(module: str, roles: dict[str, str]) -> LoraModule:
    if "a" not in roles or "b" not in roles:
        missing = "lora_A" if "a" not in roles else "lora_B"
        raise AdapterWeightsError(
            f"The adapter has an incomplete LoRA pair for {module}: {missing} is missing. "
            "The adapter file is damaged; save it again with PEFT."
        )
    return LoraModule(
        module,
        a=roles["a"],
        b=roles["b"],
        magnitude=roles.get("magnitude"),
        b_bias=roles.get("b_bias"),
        is_embedding="embedding" in roles,
    )


def load_adapter_weights(path: str | Path, config: AdapterConfig | None = None) -> AdapterWeights:
    """Tensor names and shapes of the adapter, grouped into LoRA modules and whole-tensor replacements.

    For an adapter that merge_core.peft_types plans (``config`` given), its own tensors are left to that
    package: only the keys it does not claim (modules_to_save copies, saved embeddings) are sorted here.
    """
    path = Path(path)
    file = path / ADAPTER_SAFETENSORS
    if not file.is_file():
        file = path / ADAPTER_PICKLE
    if not file.is_file():
        raise AdapterWeightsError(
            f"No adapter weights in {path}: expected {ADAPTER_SAFETENSORS} (or {ADAPTER_PICKLE})."
        )
    specs = _read_specs(file)
    if not specs:
        # e.g. alpaca-lora's 443-byte adapter_model.bin, saved before any weight was in it
        raise AdapterWeightsError(f"{file} holds no tensors; use a checkpoint of the adapter whose file has weights.")
    check_peft_keys(file.name, specs)
    parts: dict[str, dict[str, str]] = {}  # module -> role ("a", "b", "magnitude", "b_bias", "embedding") -> key
    replacements: dict[str, str] = {}
    keys = list(specs)
    if config is not None and _uses_registry(config):
        keys = _unclaimed_keys(config, file, keys)
    for key in keys:
        module, part, param = normalize_key(key)
        if part is None:
            if ".original_module." in f".{key}.":
                continue  # PEFT saves the untouched original next to the trained copy
            # "embed_tokens.base_layer.weight": PEFT saved the (resized) base embedding itself.
            target = module.replace(".base_layer.", ".")
            # save_embedding_layers also writes the copy under the wrapper's name; PEFT loads the plain name.
            if target not in replacements or is_wrapper_copy(replacements[target]) and not is_wrapper_copy(key):
                replacements[target] = key
            continue
        roles = parts.setdefault(module, {})
        role = _role(part, param)
        if role is not None:
            roles[role] = key
        if part.startswith("lora_embedding"):
            roles["embedding"] = key
    registry = config is not None and _uses_registry(config)
    modules = {} if registry else {module: _lora_module(module, roles) for module, roles in parts.items()}
    return AdapterWeights(path=path, file=file, specs=specs, lora_modules=modules, replacements=replacements)


def _uses_registry(config: AdapterConfig) -> bool:
    from .peft_types import uses_registry

    return uses_registry(config.raw)


def _unclaimed_keys(config: AdapterConfig, file: Path, keys: list[str]) -> list[str]:
    """The keys a peft_types record leaves to the replacement rules; LoRA tensors in a non-LoRA file are refused."""
    from .peft_types import record_for

    record = record_for(config.peft_type)
    if not record.parse_adapter(keys) and not record.shared_keys(keys):
        raise AdapterWeightsError(
            f"{file.name} holds no {config.peft_type} tensors although adapter_config.json says peft_type "
            f"{config.peft_type}; the config does not belong to these weights: save the adapter again with PEFT."
        )
    unclaimed = record.unclaimed_keys(keys)
    stray = [k for k in unclaimed if normalize_key(k)[1] is not None]
    if stray:
        raise AdapterWeightsError(
            f"{file.name} holds LoRA tensors such as {stray[0]} although adapter_config.json says peft_type "
            f"{config.peft_type}; the config does not belong to these weights: save the adapter again with PEFT."
        )
    return unclaimed
