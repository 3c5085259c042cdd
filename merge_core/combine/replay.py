"""PEFT's module order and random draws, replayed so the random dare_* types give PEFT's masks for one seed.

RNG parity needs two things PEFT does implicitly:

1. add_weighted_adapter first *injects* the new adapter, which draws random numbers for every
   new LoRA layer (nn.Linear constructors, then init_lora_weights of the first adapter:
   kaiming-uniform for True, normal for "gaussian"; torch.randn for embeddings). We replay
   exactly those draws with tensors of the same shapes.
2. it then walks the LoRA layers in model.named_modules() order. Adapter files are sorted by
   name ("layers.10" before "layers.2", "mlp" before "self_attn"), so the real order comes from
   the base model's config.json (model built on the meta device, no weights read); without a
   local config a name heuristic covering common architectures stands in, and the recipe says so.

Parity holds for PEFT on CPU in float32: on a GPU PEFT's masks come from the CUDA generator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .sources import Source, same_path
from .validate import ModuleShape

_ORDER_HINTS = {
    # the model body first, then the head; inside it embeddings, the blocks, the final norm
    "model": 2, "transformer": 2, "gpt_neox": 2, "language_model": 2, "backbone": 2, "base_model": 2,
    "embed_tokens": 0, "wte": 0, "word_embeddings": 0, "embed_in": 0, "wpe": 1, "embeddings": 0,
    "layers": 5, "h": 5, "blocks": 5, "layer": 5, "decoder": 5, "encoder": 4,
    "norm": 8, "ln_f": 8, "final_layernorm": 8, "final_layer_norm": 8,
    "lm_head": 20, "embed_out": 20, "score": 20, "classifier": 20,
    # inside a block: attention, then the MLP
    "self_attn": 10, "attn": 10, "attention": 10, "self_attention": 10, "mixer": 10,
    "cross_attn": 11, "encoder_attn": 11,
    "mlp": 12, "feed_forward": 12, "block_sparse_moe": 12, "ffn": 12,
    "q_proj": 30, "k_proj": 31, "v_proj": 32, "o_proj": 33, "qkv_proj": 30, "query_key_value": 30, "c_attn": 30,
    "query": 30, "key": 31, "value": 32, "dense": 34, "out_proj": 33,
    "gate_proj": 40, "up_proj": 41, "down_proj": 42, "gate_up_proj": 40, "c_fc": 30, "c_proj": 35,
    "fc1": 40, "fc2": 41, "w1": 40, "w2": 41, "w3": 42, "dense_h_to_4h": 40, "dense_4h_to_h": 41,
}  # fmt: skip

_TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
NOT_NEEDED = "not needed (deterministic)"
HEURISTIC = "name heuristic (no local base config.json found; pass base_model_dir for exact PEFT module order)"


def heuristic_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """A sort key that puts module names in named_modules() order on common architectures."""
    return tuple((0, int(p), "") if p.isdigit() else (1, _ORDER_HINTS.get(p, 100), p) for p in name.split("."))


def named_modules_of(base_dir: Path, task_type: str | None) -> list[str] | None:
    """named_modules() of the base model, built on the meta device from config.json (no weights)."""
    if not (base_dir / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
        classes = [_TASK_AUTO_CLASSES.get(task_type or "", "AutoModelForCausalLM"), "AutoModelForCausalLM", "AutoModel"]
        with torch.random.fork_rng(devices=[]):
            for cls_name in dict.fromkeys(classes):
                try:
                    with torch.device("meta"):
                        model = getattr(transformers, cls_name).from_config(config)
                except Exception:  # noqa: BLE001 - an unknown architecture: try the next class
                    continue
                return [n for n, _ in model.named_modules()]
    except Exception:  # noqa: BLE001 - remote code, broken config: fall back to the heuristic
        return None
    return None


def _base_candidates(sources: list[Source], base_model_dir: Path | None) -> list[Path]:
    candidates = [Path(base_model_dir)] if base_model_dir is not None else []
    for s in sources:
        declared = s.config.base_model_name_or_path
        if declared and Path(declared).is_dir() and not any(same_path(Path(declared), c) for c in candidates):
            candidates.append(Path(declared))
    return candidates


def order_modules(names: Iterable[str], sources: list[Source], base_model_dir: Path | None) -> tuple[list[str], str]:
    """``names`` in PEFT's walking order, and where that order came from (for the recipe)."""
    names = list(names)
    task = next((s.config.task_type for s in sources if s.config.task_type), None)
    for base in _base_candidates(sources, base_model_dir):
        order = named_modules_of(base, task)
        if order is None:
            continue
        position = {n: i for i, n in enumerate(order)}
        if all(n in position for n in names):
            return sorted(names, key=position.__getitem__), f"named_modules() of the base model config in {base}"
    return sorted(names, key=heuristic_key), HEURISTIC


def replay_injection(init: Any, rank: int, shape: ModuleShape) -> None:
    """The random draws PEFT makes when it injects the new adapter into one layer (update_layer)."""
    if shape.is_embedding:
        a = torch.randn((rank, shape.in_features))
        b = torch.randn((shape.out_features, rank))
        if init:  # reset_lora_parameters, embedding branch
            torch.nn.init.zeros_(a)
            torch.nn.init.normal_(b)
        return
    lora_a = torch.nn.Linear(shape.in_features, rank, bias=False)
    torch.nn.Linear(rank, shape.out_features, bias=False)
    if init is True:
        torch.nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    elif isinstance(init, str) and init.lower() == "gaussian":
        torch.nn.init.normal_(lora_a.weight, std=1 / rank)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """torch.manual_seed(seed) inside a forked CPU RNG state: the caller's generator is left as it was.

    None uses (and advances) the caller's generator.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
