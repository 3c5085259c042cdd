"""Which adapter keys PEFT's loader takes: a merge reproduces PeftModel.from_pretrained, so it reads no others."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import AdapterWeightsError

PEFT_PREFIX = "base_model.model."


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
