"""Why a combination of adapters was refused; the base classes let callers catch them with merge_core's own."""

from __future__ import annotations

from ..errors import AdapterBaseMismatchError, MergeError, UnsupportedAdapterError


class CombinationArgumentError(MergeError, ValueError):
    """The combination request itself is invalid (no adapters, bad weights or parameters)."""


class UnknownCombinationTypeError(CombinationArgumentError):
    """The combination type is not one we support."""


class IncompatibleAdaptersError(UnsupportedAdapterError):
    """These adapters cannot be combined with this combination type (ranks, targets, ...)."""


class UnsupportedCombinationError(UnsupportedAdapterError):
    """An adapter uses a feature that cannot be combined exactly (DoRA, lora_bias, ...)."""


class DifferentBaseModelsError(AdapterBaseMismatchError):
    """The adapters were trained for different base models."""
