"""Logical shapes of 4-bit weights from metadata alone, for a plan made before any shard is downloaded.

A bitsandbytes 4-bit weight is stored flat ([n/2, 1] bytes); its [out, in] shape lives in the
quant-state JSON inside the shard's data. Without the data, the model class knows the shapes:
transformers builds it from the config on the meta device (no memory), and every shape we take
from it must fit the stored byte count. The merge itself still reads the exact state
(resolve_shapes) after the download.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from .detect import plain_config
from .types import QuantizedBase, QuantKind


def config_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the model the config describes, built on the meta device.

    Empty when transformers cannot build it (remote code, a class it does not know): the caller
    then leaves those 4-bit shapes open until the quant states are read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**plain_config(config))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError, ImportError, AttributeError, RuntimeError):
        return {}
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def with_shape_hints(qbase: QuantizedBase, hints: Mapping[str, tuple[int, ...]]) -> QuantizedBase:
    """Fill each open 4-bit shape from ``hints`` (e.g. config_shapes) where the hint fits the stored bytes.

    The 4-bit state (blocksize, nesting) stays unread, so ``resolved`` stays False and
    dequantization still needs ``resolve_shapes``; planning only needs the shapes.
    """
    tensors = {}
    for name, t in qbase.tensors.items():
        hint = hints.get(name)
        if t.kind is QuantKind.BNB_4BIT and t.shape is None and hint is not None and t.fits_shape(hint):
            t = replace(t, shape=tuple(hint))
        tensors[name] = t
    return qbase.with_tensors(tensors)
