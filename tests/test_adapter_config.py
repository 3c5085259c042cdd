"""adapter_config.json values of the wrong type: refused when the config is read, one sentence each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from merge_core.adapter import load_adapter_config, load_adapter_weights, parse_adapter_config
from merge_core.errors import AdapterConfigError, AdapterWeightsError
from tests.factories import make_adapter, make_base

_GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
_BOOL = "true or false"
_NAMES = "a list of module names or one regular expression string"
_LAYERS = "a layer index or a list of layer indexes"

BAD: list[tuple[str, Any, str]] = [
    ("r", "8", "a positive integer"),
    ("r", 8.0, "a positive integer"),
    ("r", 0, "a positive integer"),
    ("r", -4, "a positive integer"),
    ("r", True, "a positive integer"),
    ("r", None, "a positive integer"),
    ("lora_alpha", "16", "a finite number"),
    ("lora_alpha", math.nan, "a finite number"),
    ("lora_alpha", math.inf, "a finite number"),
    ("lora_alpha", False, "a finite number"),
    ("lora_alpha", None, "a finite number"),
    ("use_rslora", "true", _BOOL),
    ("use_dora", 1, _BOOL),
    ("fan_in_fan_out", "no", _BOOL),
    ("lora_bias", "false", _BOOL),
    ("ensure_weight_tying", 0, _BOOL),
    ("rank_pattern", ["q_proj"], "an object mapping module names to positive integers"),
    ("rank_pattern", {"q_proj": "8"}, "an object mapping module names to positive integers"),
    ("rank_pattern", {"q_proj": 0}, "an object mapping module names to positive integers"),
    ("alpha_pattern", {"q_proj": "16"}, "an object mapping module names to finite numbers"),
    ("alpha_pattern", 16, "an object mapping module names to finite numbers"),
    ("target_modules", 5, _NAMES),
    ("target_modules", ["q_proj", 7], _NAMES),
    ("target_modules", {"q_proj": True}, _NAMES),
    ("exclude_modules", 3, _NAMES),
    ("modules_to_save", {"lm_head": 1}, "a list such as"),
    ("modules_to_save", [3], "a list such as"),
    ("modules_to_save", "lm_head", 'a list such as ["lm_head"]'),
    ("layers_to_transform", "0", _LAYERS),
    ("layers_to_transform", [0, "1"], _LAYERS),
    ("layers_to_transform", [True], _LAYERS),
    ("layers_to_transform", 1.5, _LAYERS),
    ("layers_pattern", 3, "a module name or a list of module names"),
    ("layers_pattern", ["layers", 2], "a module name or a list of module names"),
    ("lora_dropout", "0.1", "a number"),
    ("bias", "lora", 'one of "none", "all" or "lora_only"'),
    ("bias", True, 'one of "none", "all" or "lora_only"'),
    ("init_lora_weights", 1, "true, false or the name of an initialisation"),
    ("task_type", 5, "one of PEFT's task types"),
    ("base_model_name_or_path", ["a", "b"], "a model ID or a path"),
    ("revision", 1, "a branch, tag or commit"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_value_of_the_wrong_type_is_refused_by_name(key: str, value: Any, expected: str) -> None:
    with pytest.raises(AdapterConfigError) as refusal:
        parse_adapter_config({**_GOOD, key: value}, source="adapter_config.json")
    message = refusal.value.args[0]
    shown = repr(value) if isinstance(value, float) and not math.isfinite(value) else json.dumps(value)
    assert message.startswith(f"adapter_config.json: {key} is {shown} but must be {expected}")
    assert message.endswith("; correct it in the file (or save the adapter again with PEFT).")


GOOD: list[tuple[str, Any]] = [
    ("r", 16),
    ("lora_alpha", 0.5),
    ("lora_alpha", 32),
    ("target_modules", "all-linear"),
    ("target_modules", None),
    ("modules_to_save", ["lm_head"]),
    ("modules_to_save", None),
    ("rank_pattern", {"q_proj": 4}),
    ("alpha_pattern", {"v_proj": 2.5}),
    ("layers_to_transform", 1),
    ("layers_to_transform", [0, 1]),
    ("layers_pattern", ["layers"]),
    ("use_dora", None),
    ("bias", "none"),
    ("init_lora_weights", "gaussian"),
    ("task_type", None),
]


@pytest.mark.parametrize(("key", "value"), GOOD, ids=[f"{k}={v!r}" for k, v in GOOD])
def test_values_peft_accepts_are_accepted(key: str, value: Any) -> None:
    config = parse_adapter_config({**_GOOD, key: value})
    assert config.raw[key] == value
    assert isinstance(config.r, int) and isinstance(config.lora_alpha, float)


def test_defaults_when_keys_are_absent() -> None:
    config = parse_adapter_config({"peft_type": "LORA"})
    assert (config.peft_type, config.r, config.lora_alpha, config.target_modules) == ("LORA", 8, 8.0, None)


def test_a_string_rank_in_a_saved_adapter_is_refused_when_it_is_read(tmp_path: Path) -> None:
    """The issue's case: "r": "8" used to pass here and crash verification later."""
    adapter = make_adapter(make_base(tmp_path / "base"), tmp_path / "adapter")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": "4"}))
    with pytest.raises(AdapterConfigError, match=r'adapter_config\.json: r is "4" but must be a positive integer'):
        load_adapter_config(adapter)


def test_peft_type_must_be_a_string() -> None:
    with pytest.raises(AdapterConfigError, match=r'peft_type is 5 but must be a string such as "LORA"'):
        parse_adapter_config({**_GOOD, "peft_type": 5})


def test_lora_modules_always_have_both_factors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(make_base(tmp_path / "base"), tmp_path / "adapter", target_modules=["q_proj"])
    modules = load_adapter_weights(adapter).lora_modules
    assert modules and all(m.a.endswith("lora_A.weight") and m.b.endswith("lora_B.weight") for m in modules.values())

    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    dropped = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, file)
    with pytest.raises(AdapterWeightsError, match="incomplete LoRA pair .*: lora_B is missing"):
        load_adapter_weights(adapter)
