"""The full tensors an adapter ships (modules_to_save copies): which ones PEFT loads onto the base, and
which ones it cannot load back at all."""

from __future__ import annotations

from .adapter import AdapterConfig, AdapterWeights
from .checkpoint import BaseCheckpoint
from .errors import UnsupportedAdapterError
from .targets import saved_module_names, wrapped_module
from .tensor_names import input_embedding


def refuse_quantized_copy(base: BaseCheckpoint, adapter: AdapterWeights, *, target: str, key: str) -> None:
    """An adapter saved from a quantized model can ship a quantized weight's packed bytes and quant state (PEFT's
    save_embedding_layers on a 4-bit lm_head): PEFT cannot load them back onto the base, so nothing equals it."""
    quant = base.quant
    if quant is None:
        return
    weight = next((t for t in quant.tensors.values() if target == t.name or target in t.side_tensors), None)
    if weight is None or (target == weight.name and adapter.specs[key].dtype.is_floating_point):
        return  # a float copy (modules_to_save trained on the full-precision model) replaces the weight
    module = weight.name.removesuffix(".weight")
    raise UnsupportedAdapterError(
        f"The adapter ships a bitsandbytes-quantized copy of {module} (PEFT's saved embedding layers), which PEFT "
        "cannot load back onto the quantized base; save the adapter again with save_embedding_layers=False or "
        f"delete the {module}.base_layer tensors from its file."
    )


def loaded_by_peft(module_tensor: str, key: str, config: AdapterConfig) -> bool:
    """A modules_to_save copy is loaded only into a module PEFT wrapped (targets.wrapped_module: an entry of
    modules_to_save or a head its task adds); any other copy is an unexpected key PEFT skips."""
    if ".modules_to_save." not in f".{key}.":
        return True
    return wrapped_module(module_tensor, saved_module_names(config)) is not None


def token_rows(base: BaseCheckpoint) -> set[int]:
    """Row counts of a tensor with a row per token, the copies a resized vocabulary changes in size: vocab_size,
    and the embedding's own (Mllama's has 8 more)."""
    embed = input_embedding(base)
    rows = {base.tensors[embed].info.shape[0]} if embed is not None else set()
    vocab = base.text_config().get("vocab_size")
    return rows | ({vocab} if isinstance(vocab, int) else set())
