"""The combination types as data: one record each says how it builds the new factors and what it needs.

Every PEFT type is a layout (how the new a and b come about) times one of PEFT's merge_utils
functions (how several tensors become one); "stack" is our exact sum of the adapters' deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path

import torch
from peft.utils import merge_utils

from .errors import UnknownCombinationTypeError


class Layout(Enum):
    """How the combined adapter's factors come about."""

    STACK = "stack"  # every adapter's own factors side by side, modules_to_save and biases kept: the exact sum
    CONCAT = "cat"  # PEFT's "cat": the same concatenation, with PEFT's config rules
    FACTORS = "factors"  # the a's and the b's combined separately: needs equal ranks
    SVD = "svd"  # the full deltas combined, then truncated to svd_rank by an SVD


class MajoritySign(StrEnum):
    """How ties elects each value's sign: by the sum of the values, or by the count of each sign."""

    TOTAL = "total"
    FREQUENCY = "frequency"


@dataclass(frozen=True)
class Arithmetic:
    """One of PEFT's merge_utils functions and what it needs; calling PEFT keeps the results equal to PEFT's."""

    name: str
    function: Callable[..., torch.Tensor]
    density: bool = False
    sign_election: bool = False
    random: bool = False

    def __call__(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, *, density: float | None, majority_sign: MajoritySign
    ) -> torch.Tensor:
        kwargs: dict[str, object] = {}
        if self.density:
            kwargs["density"] = density
        if self.sign_election:
            kwargs["majority_sign_method"] = majority_sign.value
        return self.function(tensors, weights, **kwargs)


TASK_ARITHMETIC = Arithmetic("linear", merge_utils.task_arithmetic)
TIES = Arithmetic("ties", merge_utils.ties, density=True, sign_election=True)
DARE_LINEAR = Arithmetic("dare_linear", merge_utils.dare_linear, density=True, random=True)
DARE_TIES = Arithmetic("dare_ties", merge_utils.dare_ties, density=True, sign_election=True, random=True)
MAGNITUDE_PRUNE = Arithmetic("magnitude_prune", merge_utils.magnitude_prune, density=True)


@dataclass(frozen=True)
class CombinationType:
    """A combination type: its layout and, for the PEFT types that mix tensors, PEFT's arithmetic."""

    name: str
    layout: Layout
    arithmetic: Arithmetic | None = None

    @property
    def is_peft(self) -> bool:
        return self.layout is not Layout.STACK

    @property
    def needs_equal_ranks(self) -> bool:
        return self.layout is Layout.FACTORS

    @property
    def uses_svd_rank(self) -> bool:
        return self.layout is Layout.SVD

    @property
    def needs_density(self) -> bool:
        return self.arithmetic is not None and self.arithmetic.density

    @property
    def elects_signs(self) -> bool:
        return self.arithmetic is not None and self.arithmetic.sign_election

    @property
    def is_random(self) -> bool:
        return self.arithmetic is not None and self.arithmetic.random


# The order is the app's dropdown: our "stack" first, then PEFT 0.21.2's add_weighted_adapter types.
TYPES = (
    CombinationType("stack", Layout.STACK),
    CombinationType("linear", Layout.FACTORS, TASK_ARITHMETIC),
    CombinationType("cat", Layout.CONCAT),
    CombinationType("svd", Layout.SVD, TASK_ARITHMETIC),
    CombinationType("ties", Layout.FACTORS, TIES),
    CombinationType("ties_svd", Layout.SVD, TIES),
    CombinationType("dare_linear", Layout.FACTORS, DARE_LINEAR),
    CombinationType("dare_ties", Layout.FACTORS, DARE_TIES),
    CombinationType("dare_linear_svd", Layout.SVD, DARE_LINEAR),
    CombinationType("dare_ties_svd", Layout.SVD, DARE_TIES),
    CombinationType("magnitude_prune", Layout.FACTORS, MAGNITUDE_PRUNE),
    CombinationType("magnitude_prune_svd", Layout.SVD, MAGNITUDE_PRUNE),
)
COMBINATION_TYPES = tuple(t.name for t in TYPES)
_BY_NAME = {t.name: t for t in TYPES}
# PEFT: "if there is only one adapter, we can only use linear merging".
SINGLE_ADAPTER = _BY_NAME["linear"]


def lookup(name: str | CombinationType) -> CombinationType:
    """The record of a combination type given by name (or the record itself)."""
    if isinstance(name, CombinationType):
        return name
    if name not in _BY_NAME:
        raise UnknownCombinationTypeError(
            f"Unknown combination type {name!r}. Choose one of: {', '.join(COMBINATION_TYPES)}."
        )
    return _BY_NAME[name]


@dataclass(frozen=True)
class CombinationOptions:
    """The parameters of a combination, checked against its type (validate.check_options)."""

    svd_rank: int | None = None
    svd_clamp: float | None = None
    density: float | None = None
    majority_sign: MajoritySign = MajoritySign.TOTAL
    # dare_* only: the CPU generator is seeded with it inside a forked RNG state; None uses (and advances) it.
    seed: int | None = 0
    # A local base model folder (config.json) to order the modules as model.named_modules() does.
    base_model_dir: Path | None = None
