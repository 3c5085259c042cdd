"""The merge plan as data: what each output tensor is made of, decided before any data moves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .adapter import AdapterConfig, AdapterWeights
from .checkpoint import BaseCheckpoint, BaseTensor
from .options import COMPUTE_DTYPES, MergeOptions
from .safetensors_io import DTYPE_FROM_ST, PlannedTensor

if TYPE_CHECKING:
    from .quant import QuantizedTensor


@dataclass(frozen=True)
class LowRankDelta:
    """delta_stored = scale * left @ right, in the orientation the base tensor is stored in.

    For nn.Linear (stored (out, in)) left = B and right = A; for Conv1D and embeddings
    (stored transposed) left = A.T and right = B.T: ``*_transpose`` says which.
    """

    module: str
    left_key: str
    right_key: str
    left_transpose: bool
    right_transpose: bool
    scale: float
    rank: int
    alpha: float


@dataclass(frozen=True)
class DoraSpec:
    magnitude_key: str
    # "row": the magnitude scales each stored row (Linear); "col": each stored column
    # (Conv1D and Embedding), which needs the column norms of the whole tensor first.
    axis: Literal["row", "col"]


@dataclass
class ModulePlan:
    """One base module the adapter changes (for the report and the verification)."""

    module: str
    tensor: str
    kind: Literal["linear", "conv", "embedding", "replaced"]
    variant: str
    shape: tuple[int, ...]
    rank: int = 0
    alpha: float = 0.0
    scale: float = 0.0
    fan_in_fan_out: bool = False


@dataclass
class OutputTensorPlan:
    name: str
    dtype: str  # safetensors dtype of the output
    shape: tuple[int, ...]
    base: BaseTensor | None = None  # where the starting value comes from...
    adapter_key: str | None = None  # ...or the adapter (modules_to_save, resized embeddings)
    deltas: list[LowRankDelta] = field(default_factory=list)
    bias_deltas: list[tuple[str, float]] = field(default_factory=list)  # (adapter key of lora_B.bias, scale)
    dora: DoraSpec | None = None
    quantized: QuantizedTensor | None = None  # the base's value is decoded from these stored tensors
    ops: list[Any] = field(default_factory=list)  # merge_core.peft_types specs, applied after the deltas

    @property
    def is_copy(self) -> bool:
        return self.base is not None and not self.changed and self.base.info.dtype == self.dtype

    @property
    def changed(self) -> bool:
        return bool(self.deltas or self.bias_deltas or self.dora or self.adapter_key or self.ops)

    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.dtype, self.shape)


@dataclass
class MergePlan:
    base: BaseCheckpoint
    adapter_config: AdapterConfig
    adapter: AdapterWeights
    options: MergeOptions
    output_dtype: str
    tensors: list[OutputTensorPlan]
    shards: list[list[OutputTensorPlan]]
    modules: list[ModulePlan]
    config: dict[str, Any]
    copy_files: dict[str, Path]  # output file name -> source file
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def output_nbytes(self) -> int:
        return sum(math.prod(t.shape) * _element_size(t.dtype) for t in self.tensors)

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.options.compute_dtype]

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _element_size(st_dtype: str) -> int:
    return torch.empty((), dtype=DTYPE_FROM_ST[st_dtype]).element_size()
