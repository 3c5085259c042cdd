"""Which adapter keys PEFT's loader takes: a merge reproduces PeftModel.from_pretrained, so it reads no others."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import AdapterWeightsError

PEFT_PREFIX = "base_model.model."


def check_peft_keys(file_name: str, keys: Iterable[str]) -> None:
    """Refuse an adapter file with keys PEFT's loader skips (no prefix, or twice); a modules_to_save copy under
    the wrapper's name only is judged by the planner, which knows what modules_to_save names (wrapper_only_copy)."""
    check_peft_prefix(file_name, list(keys))


def is_wrapper_copy(key: str) -> bool:
    """A modules_to_save copy under the wrapper's in-memory name (``lm_head.modules_to_save[.default].weight``)."""
    return ".modules_to_save." in f".{key}."


def wrapper_only_copy(file_name: str, key: str) -> AdapterWeightsError:
    """PEFT looks a modules_to_save copy up under the module's own name (``lm_head.weight``); save_embedding_layers
    also writes it under the wrapper's name (``lm_head.modules_to_save.weight``), which PEFT then skips. A file with
    only the wrapper's name (a raw state_dict) makes PEFT raise KeyError where modules_to_save names the module
    (where it does not, PEFT skips the key and so does the planner)."""
    parts = key.split(".")
    i = parts.index("modules_to_save")
    plain = ".".join(parts[:i] + parts[i + (2 if len(parts) - i > 2 else 1) :])
    return AdapterWeightsError(
        f"{file_name} holds {key}, a modules_to_save copy under the wrapper's in-memory name, without "
        f"{plain}, the name PEFT loads it from; rename the key to {plain} (or save the adapter again with "
        "PEFT's save_pretrained)."
    )


def check_peft_prefix(file_name: str, keys: Iterable[str]) -> None:
    """Refuse keys PEFT would skip: PeftModel.from_pretrained loads only keys named as in a PeftModel
    (``base_model.model.<module>...``, VeRA's ``base_model.vera_A``). A key without the prefix, or with it twice (a
    PeftModel wrapped in another), is left out with a warning, and PEFT's model is then not the one the file describes.
    """
    for key in keys:
        twice = key.startswith(PEFT_PREFIX * 2)
        if twice or not key.startswith("base_model."):
            how = "with PEFT's base_model.model. prefix twice" if twice else "without PEFT's base_model.model. prefix"
            raise AdapterWeightsError(
                f"{file_name} names tensors such as {key} {how}, so PEFT would load none of them onto the base "
                "model; rename the keys to start with a single base_model.model. (or save the adapter again with "
                "PEFT's save_pretrained)."
            )
