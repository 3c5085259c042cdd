"""The two low-rank factors of a LoRA module and the rules they obey, for the planner and for combine.

Vocabulary, everywhere: ``a`` is lora_A, shaped (r, in_features); ``b`` is lora_B, shaped
(out_features, r); the delta is ``scale * b @ a``. An embedding LoRA keeps the same roles in
lora_embedding_A (r, num_embeddings) and lora_embedding_B (embedding_dim, r).

Orientation: nn.Linear stores its weight (out_features, in_features), so the delta lands as
``b @ a``; transformers' Conv1D (``fan_in_fan_out``) and an embedding seen from LoRA's side store
(in_features, out_features), so the delta lands as ``(b @ a).T = a.T @ b.T``.

Convolutions (nn.Conv1d/2d/3d): PEFT gives lora_A the base's kernel, (r, in_channels, *kernel), and
lora_B a 1 x ... x 1 kernel, (out_channels, r, 1, ...); seen as matrices (tensor_math.as_matrix) they
are a (r, in * kernel) and b (out, r), and the delta is ``(b @ a).reshape(weight shape)``, stored as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .adapter import AdapterConfig, AdapterWeights, LoraModule
from .errors import AdapterConfigError, AdapterWeightsError, UnsupportedAdapterError

# Models whose linear layers are transformers' Conv1D, stored (in_features, out_features).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt"})


@dataclass(frozen=True)
class FactorShapes:
    """The checked shapes of one module's factors: a (r, in_features), b (out_features, r)."""

    module: str
    a: tuple[int, int]
    b: tuple[int, int]
    is_embedding: bool
    kernel: tuple[int, ...] = ()  # a convolution's kernel size; () for Linear, Conv1D and Embedding

    @property
    def rank(self) -> int:
        return self.a[0]

    @property
    def in_features(self) -> int:
        return self.a[1]

    @property
    def out_features(self) -> int:
        return self.b[0]


def checked_factors(
    config: AdapterConfig, adapter: AdapterWeights, module: LoraModule, *, adapter_name: str | None = None
) -> FactorShapes:
    """The shapes of ``module``'s factors once a, b and the config agree on one rank.

    Raises UnsupportedAdapterError for LoRA on a grouped convolution, AdapterWeightsError when a and b
    disagree, AdapterConfigError when r / rank_pattern disagrees.
    ``adapter_name`` names the adapter in the message where several are read together.
    """
    where = f"Adapter {adapter_name!r}: {module.module}" if adapter_name else module.module
    a, b = adapter.specs[module.a].shape, adapter.specs[module.b].shape
    kernel = _conv_kernel(where, tuple(a), tuple(b), is_embedding=module.is_embedding)
    rank = a[0]
    if b[1] != rank:
        raise AdapterWeightsError(
            f"{where}: lora_A has rank {rank} but lora_B has rank {b[1]}; the adapter file is inconsistent, so "
            "save it again with PEFT."
        )
    configured = config.rank_for(module.module)
    if configured != rank:
        raise AdapterConfigError(
            f"{where}: adapter_config.json says rank {configured} (r / rank_pattern) but the weights have rank "
            f"{rank}. The config does not belong to these weights; save the adapter again with PEFT."
        )
    return FactorShapes(module.module, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), module.is_embedding, kernel)


def _conv_kernel(where: str, a: tuple[int, ...], b: tuple[int, ...], *, is_embedding: bool) -> tuple[int, ...]:
    """The kernel of a convolution's factors, () for matrices; refuses shapes PEFT never saves and grouped convs."""
    if len(a) == 2 and len(b) == 2:
        return ()
    if is_embedding or len(a) != len(b) or len(a) not in (3, 4, 5) or any(d != 1 for d in b[2:]):
        raise AdapterWeightsError(
            f"{where}: lora_A has shape {list(a)} and lora_B {list(b)}, neither LoRA matrices nor the factors PEFT "
            "gives a convolution; the adapter file is broken, save it again with PEFT."
        )
    if b[1] != a[0] and b[1] > 0 and a[0] % b[1] == 0:
        # PEFT makes lora_B a grouped 1x1 conv, so B @ A mixes every input channel into every group:
        # a dense kernel that the grouped weight (out, in / groups, ...) cannot hold; PEFT refuses to merge it too.
        raise UnsupportedAdapterError(
            f"{where}: LoRA on a convolution with groups={a[0] // b[1]} cannot be merged into its grouped weight "
            "(PEFT cannot merge it either); remove this layer from target_modules."
        )
    return tuple(int(d) for d in a[2:])


def read_factors(
    adapter: AdapterWeights, module: LoraModule, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of ``module`` as contiguous tensors of ``dtype``."""
    a = adapter.tensor(module.a).to(dtype).contiguous()
    b = adapter.tensor(module.b).to(dtype).contiguous()
    return a, b


def peft_delta_transposed(*, is_embedding: bool, fan_in_fan_out: bool) -> bool:
    """PEFT's get_delta_weight: ``(b @ a).T`` for embeddings and fan_in_fan_out layers, ``b @ a`` otherwise."""
    return is_embedding or fan_in_fan_out


def model_stores_transposed(
    *, fan_in_fan_out: bool, model_type: str, stored: Iterable[tuple[FactorShapes, tuple[int, ...]]]
) -> bool:
    """Whether a model's square Linear-like weights are stored (in, out), as transformers' Conv1D does.

    ``stored`` pairs each module's factors with the shape of the base tensor it lands on: a
    non-square module stored (in, out) shows the layout when neither the config nor the model type says it.
    """
    if fan_in_fan_out or model_type in CONV1D_MODEL_TYPES:
        return True
    return any(
        not f.is_embedding and f.in_features != f.out_features and shape == (f.in_features, f.out_features)
        for f, shape in stored
    )


def delta_transposed(factors: FactorShapes, shape: tuple[int, ...], *, model_transposed: bool) -> bool | None:
    """Whether the delta lands on a base tensor of ``shape`` as ``(b @ a).T``; None when it fits neither way.

    A square Linear-like weight cannot tell its layout: ``model_transposed`` (model_stores_transposed) decides.
    """
    stored_in_out = (factors.in_features, factors.out_features)
    if factors.is_embedding:
        return True if shape == stored_in_out else None
    stored_out_in = (factors.out_features, factors.in_features)
    if stored_out_in == stored_in_out and shape == stored_out_in:
        return model_transposed
    if shape == stored_out_in:
        return False
    if shape == stored_in_out:
        return True
    return None
