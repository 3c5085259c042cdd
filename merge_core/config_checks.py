"""adapter_config.json's values checked as PEFT would take them: types first, then the strings PEFT compiles
into regular expressions. Each refusal names the key, the value and what it must be, in one sentence."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from .errors import AdapterConfigError

ADAPTER_CONFIG = "adapter_config.json"


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    # bool is an int in Python, but "r": true is no rank; PEFT itself needs a real int (it compares r <= 0).
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value: Any) -> bool:
    # json.loads accepts NaN and Infinity; either would make every merged weight NaN/Inf.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_or_str_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _is_layer_indexes(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _is_task_type(value: Any) -> bool:
    # PeftConfig.__post_init__ refuses any other name, so PEFT could not load the adapter at all.
    from peft import TaskType

    return isinstance(value, str) and value in {t.value for t in TaskType}


def _is_pattern_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


# key -> (check, what the key must be); a key absent from the file (or null where allowed) takes PEFT's default.
_REQUIRED_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (_is_positive_int, "a positive integer such as 8"),
    "lora_alpha": (_is_finite_number, "a finite number such as 16"),
}
_OPTIONAL_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_rslora": (_is_bool, "true or false"),
    "use_dora": (_is_bool, "true or false"),
    "fan_in_fan_out": (_is_bool, "true or false"),
    "lora_bias": (_is_bool, "true or false"),
    "ensure_weight_tying": (_is_bool, "true or false"),
    "rank_pattern": (_is_pattern_of(_is_positive_int), "an object mapping module names to positive integers"),
    "alpha_pattern": (_is_pattern_of(_is_finite_number), "an object mapping module names to finite numbers"),
    "target_modules": (_is_str_or_str_list, "a list of module names or one regular expression string"),
    "exclude_modules": (_is_str_or_str_list, "a list of module names or one regular expression string"),
    # PEFT matches a bare string letter by letter (wrapping "model" for its "l"), then cannot load the adapter.
    "modules_to_save": (lambda v: isinstance(v, list) and _is_str_or_str_list(v), 'a list such as ["lm_head"]'),
    "layers_to_transform": (_is_layer_indexes, "a layer index or a list of layer indexes (integers)"),
    "layers_pattern": (_is_str_or_str_list, 'a module name or a list of module names, such as "layers"'),
    "lora_dropout": (_is_finite_number, "a number such as 0.05"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), 'one of "none", "all" or "lora_only"'),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or the name of an initialisation"),
    "task_type": (_is_task_type, 'one of PEFT\'s task types in capitals, such as "CAUSAL_LM" or "SEQ_CLS"'),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a model ID or a path"),
    "revision": (lambda v: isinstance(v, str), "a branch, tag or commit of the base model"),
}


def shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 80 else text[:60] + "…" + text[-15:]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# OFT/BOFT size their blocks by oft_block_size and save r = 0; a rank of 0 is only wrong for LoRA.
_OTHER_TYPES_R = (_is_count, "a non-negative integer")


# Where PEFT puts a config string into a regular expression (check_target_module_exists, get_pattern_key): a
# string that does not compile there makes PEFT raise re.error, so it is refused by name before any module is matched.
_REGEX_TEMPLATES: dict[str, str] = {
    "target_modules": "{}",  # only when it is one string; a list holds plain names
    "exclude_modules": "{}",
    "rank_pattern": r"(.*\.)?({})$",
    "alpha_pattern": r"(.*\.)?({})$",
    "layers_pattern": r"(?:^|.*?\.){}\.(?P<idx>\d+)\.",
    "modules_to_save": r"(^|.*\.){}($|\..*)",
}
_REGEX_OF_EVERY_ITEM = ("layers_pattern", "modules_to_save")


def _regex_strings(key: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return list(value)
    if isinstance(value, str):
        return [value]
    return list(value) if key in _REGEX_OF_EVERY_ITEM and isinstance(value, list) else []


def check_config_regexes(data: dict[str, Any], source: str = ADAPTER_CONFIG) -> None:
    """Refuse a string PEFT would compile into a regular expression that does not compile."""
    for key, template in _REGEX_TEMPLATES.items():
        for text in _regex_strings(key, data.get(key)):
            try:
                re.compile(text)  # its own error first: the positions then point into the user's text
                re.compile(template.format(text))
            except re.error as exc:
                raise AdapterConfigError(
                    f"{source}: {key} holds {shown(text)}, which is not a valid regular expression ({exc}); "
                    "correct it in the file (or save the adapter again with PEFT)."
                ) from None


def check_config_types(data: dict[str, Any], source: str = ADAPTER_CONFIG) -> None:
    """Refuse values of the wrong type up front, one sentence naming the key, the value and what it must be."""
    lora = str(data.get("peft_type", "")).upper() == "LORA"
    required = _REQUIRED_TYPES if lora else {**_REQUIRED_TYPES, "r": _OTHER_TYPES_R}
    checks = [(k, *required[k], False) for k in required if k in data]
    checks += [(k, *_OPTIONAL_TYPES[k], True) for k in _OPTIONAL_TYPES if k in data]
    for key, check, expected, nullable in checks:
        value = data[key]
        if (value is None and nullable) or check(value):
            continue
        raise AdapterConfigError(
            f"{source}: {key} is {shown(value)} but must be {expected}; correct it in the file "
            "(or save the adapter again with PEFT)."
        )
