"""VB-LoRA: LoRA factors assembled from a shared bank of vectors, each sub-vector a top-k softmax mixture."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import AdapterContext, ModuleInput, linear_features, mismatch, number, require
from .ops import LowRankRows, RowOp
from .specs import Reader, ReadTensor, Spec, spec_class

VBLORA_TOKENS = (
    "vblora_logits_A",
    "vblora_logits_B",
    "vblora_logits_A_topk_indices",
    "vblora_logits_A_topk_weights",
    "vblora_logits_B_topk_indices",
    "vblora_logits_B_topk_weights",
)
VBLORA_SHARED = ("vblora_vector_bank",)


def _mixture(keys: tuple[str, ...], bank: Tensor, topk: int, read_tensor: ReadTensor) -> Tensor:
    """sum_k w_k bank[i_k] over the last axis: from full logits (top-k softmax) or the saved top-k."""
    device, dtype = bank.device, bank.dtype
    if len(keys) == 1:
        top, indices = read_tensor(keys[0]).to(device=device, dtype=dtype).topk(topk, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:  # save_only_topk_weights keeps k-1 weights; the last one is what makes them sum to 1
        indices = read_tensor(keys[0]).to(device=device, dtype=torch.long)
        weights = read_tensor(keys[1]).to(device=device, dtype=dtype)
        weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


@spec_class("vblora top{topk}")
class VbloraSpec(Spec):
    """VB-LoRA: scale-free B @ A, both factors mixed from the shared vector bank at load time."""

    a_keys: tuple[str, ...]  # (logits,) or (topk indices, topk weights)
    b_keys: tuple[str, ...]
    bank_key: str
    topk: int
    transposed: bool

    def row_op(self, read: Reader) -> RowOp:
        bank = read(self.bank_key)
        a = _mixture(self.a_keys, bank, self.topk, read.read_tensor)  # (r, in / L, L)
        b = _mixture(self.b_keys, bank, self.topk, read.read_tensor)  # (out / L, r, L)
        a = a.reshape(a.shape[0], -1)
        b = b.transpose(1, 2).reshape(-1, b.shape[1])
        if self.transposed:
            return LowRankRows(a.T.contiguous(), b.T.contiguous(), 1.0)
        return LowRankRows(b.contiguous(), a.contiguous(), 1.0)


def _side(module: ModuleInput, side: str) -> tuple[str, ...]:
    if f"vblora_logits_{side}" in module.keys:
        return (module.keys[f"vblora_logits_{side}"],)
    return tuple(
        require(module.name, module.keys, f"vblora_logits_{side}_topk_indices", f"vblora_logits_{side}_topk_weights")
    )


def vblora_ops(module: ModuleInput, context: AdapterContext) -> list[Spec]:
    out_f, in_f = linear_features("VBLORA", module)
    if "vblora_vector_bank" not in context.shared:
        raise mismatch(module.name, "the adapter file has no vblora_vector_bank, which every VB-LoRA module reads")
    bank = tuple(context.shapes[context.shared["vblora_vector_bank"]])
    a, b = _side(module, "A"), _side(module, "B")
    a_shape, b_shape = tuple(context.shapes[a[0]]), tuple(context.shapes[b[0]])
    length = bank[-1]
    if len(a_shape) != 3 or len(b_shape) != 3 or a_shape[1] * length != in_f or b_shape[0] * length != out_f:
        raise mismatch(
            module.name,
            f"VB-LoRA logits {list(a_shape)} and {list(b_shape)} with vectors of length "
            f"{length} do not fit a {in_f} -> {out_f} layer",
        )
    topk = number(context.config, "topk", 2, kind=int)
    return [
        VbloraSpec(
            module.name,
            "weight",
            a,
            b,
            context.shared["vblora_vector_bank"],
            topk,
            module.stored_transposed,
        )
    ]
