"""Fused expert parameters that the checkpoint stores one tensor per expert.

transformers 5 gives MoE model classes stacked expert parameters (``mlp.experts.gate_up_proj``, [E, 2I, H]) but
saves and reads checkpoints one 2-D tensor per expert (``mlp.experts.3.gate_proj.weight``), fusing them on load
with the WeightConverters of its conversion mapping. PEFT 0.21 trains LoRA on the fused parameter
(``target_parameters``); its delta is planned here onto the per-expert tensors the checkpoint has: expert e's
slice of the fused delta, cut where transformers concatenates the sources (gate then up), as a low-rank
product of slices of the factors, so no more than one expert's factors are ever formed.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from .errors import UnsupportedAdapterError
from .peft_types.lora_specs import ExpertLowRankSpec
from .peft_types.ops import LowRankRows, RowOp
from .peft_types.specs import Reader, Spec, spec_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertPart:
    """One per-expert checkpoint tensor: rows (axis 0) or columns (axis 1) [start, stop) of expert ``expert``."""

    tensor: str
    expert: int
    axis: int
    start: int
    stop: int


@dataclass(frozen=True)
class FusedParameter:
    """A stacked parameter of the model class that the checkpoint holds as per-expert tensors."""

    name: str  # model-class name, e.g. model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, ...]  # (experts, d1, d2) as transformers builds it on load
    parts: tuple[ExpertPart, ...]
    problem: str = ""  # why the parts cannot take the fused delta (a conversion other than stack and concatenate)


@dataclass(frozen=True)
class ExpertLayout:
    fused: dict[str, FusedParameter] = field(default_factory=dict)
    # module -> its own parameter leaves in the model's order: PEFT nests one wrapper per targeted parameter in it
    parameter_order: dict[str, tuple[str, ...]] = field(default_factory=dict)


@spec_class("lora experts={experts} r={rank} alpha={alpha:g} (per-expert tensors)")
class ExpertSliceSpec(Spec):
    """One per-expert tensor's share of LoRA on a fused expert parameter: rows or columns [start, stop) of
    scale * B_e @ A_e (or its transpose, for parameters stored (experts, in, out))."""

    a_key: str
    b_key: str
    experts: int
    rank: int
    expert: int
    scale: float
    alpha: float
    transposed: bool
    axis: int
    start: int
    stop: int

    def row_op(self, read: Reader) -> RowOp:
        e, r = self.expert, self.rank
        a = _stored(read, self.a_key)[e * r : (e + 1) * r]  # A groups its rows by expert
        b = _stored(read, self.b_key)[:, e :: self.experts]  # B's columns vary the expert fastest
        a, b = a.to(device=read.device, dtype=read.dtype), b.to(device=read.device, dtype=read.dtype)
        left, right = (a.T, b.T) if self.transposed else (b, a)
        if self.axis == 0:
            left = left[self.start : self.stop]
        else:
            right = right[:, self.start : self.stop]
        return LowRankRows(left.contiguous(), right.contiguous(), self.scale)


# Every per-expert tensor of a layer reads the same two factors: the last few stay, as stored, so a layer with
# E experts reads them once rather than E times (the merge writes a layer's expert tensors one after another).
_STORED: OrderedDict[tuple[int, str], tuple[weakref.ref, Tensor]] = OrderedDict()
_STORED_LOCK = threading.Lock()
_STORED_KEPT = 4


def _stored(read: Reader, key: str) -> Tensor:
    owner = getattr(read.read_tensor, "__self__", read.read_tensor)
    slot = (id(owner), key)
    with _STORED_LOCK:
        hit = _STORED.get(slot)
        if hit is not None and hit[0]() is owner:
            _STORED.move_to_end(slot)
            return hit[1]
    tensor = read.read_tensor(key)
    try:
        ref = weakref.ref(owner)
    except TypeError:  # an owner without weak references is read every time
        return tensor
    with _STORED_LOCK:
        _STORED[slot] = (ref, tensor)
        while len(_STORED) > _STORED_KEPT:
            _STORED.popitem(last=False)
    return tensor


def expert_layout(config_dir: Path, shapes: Mapping[str, Sequence[int]], modules: Iterable[str]) -> ExpertLayout:
    """The fused parameters transformers builds from the checkpoint tensors ``shapes``, and the parameter order of
    ``modules`` (model-class names); empty when the model class cannot be built here (custom code)."""
    from .layouts import meta_model

    try:
        model = meta_model(config_dir)
    except Exception as exc:  # noqa: BLE001 - without the class nothing is fused and names stay as they are
        log.debug("no model class for %s: %s", config_dir, exc)
        return ExpertLayout()
    if model is None:
        return ExpertLayout()
    named = dict(model.named_modules())
    order = {m: tuple(n for n, _ in named[m].named_parameters(recurse=False)) for m in modules if m in named}
    try:
        groups = _converted(model, shapes)
    except Exception as exc:  # noqa: BLE001 - a mapping this transformers cannot apply fuses nothing we can split
        log.debug("no conversion mapping for %s: %s", config_dir, exc)
        groups = {}
    fused = {name: _fuse(name, entries, shapes) for name, entries in groups.items()}
    return ExpertLayout(fused, order)


def _converted(model: Any, names: Iterable[str]) -> dict[str, list[tuple[str, int, Any]]]:
    """{fused model name: [(checkpoint name, index of its source pattern, converter)]}, in the order transformers
    collects them (dot-natural order of the checkpoint names, so expert 10 follows expert 9)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    groups: dict[str, list[tuple[str, int, Any]]] = defaultdict(list)
    for name in sorted(names, key=dot_natural_key):
        for converter in converters:  # one at a time, to know which converter matched
            new, pattern = rename_source_key(name, renamings, [converter], model.base_model_prefix, state)
            if pattern is not None:
                groups[new].append((name, converter.source_patterns.index(pattern), converter))
                break
    return dict(groups)


def _conversion(converter: Any) -> tuple[int, str]:
    """The per-expert axis transformers concatenates the sources along, or a problem: the fused parameter must be
    the per-expert tensors stacked on a new first axis, then (with several sources) concatenated."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    stacked = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    rest = ops[1:]
    if not stacked or len(rest) > 1 or (rest and not isinstance(rest[0], Concatenate)):
        return 0, f"transformers fuses it with {', '.join(type(op).__name__ for op in ops)}"
    axis = rest[0].dim - 1 if rest else 0
    return (axis, "") if axis in (0, 1) else (0, f"transformers concatenates its sources along axis {axis + 1}")


def _fuse(name: str, entries: list[tuple[str, int, Any]], shapes: Mapping[str, Sequence[int]]) -> FusedParameter:
    axis, problem = _conversion(entries[0][2])
    sources: dict[int, list[str]] = defaultdict(list)
    for tensor, source, _ in entries:
        sources[source].append(tensor)
    lists = [sources[s] for s in sorted(sources)]  # Concatenate keeps the order of the source patterns
    counts = {len(names) for names in lists}
    kinds = {tuple(shapes[t]) for names in lists for t in names[:1]}
    if len(counts) != 1 or any({tuple(shapes[t]) for t in names} != {tuple(shapes[names[0]])} for names in lists):
        problem = problem or "its per-expert tensors differ in number or shape"
    if any(len(k) != 2 for k in kinds) or len({k[1 - axis] for k in kinds}) > 1:
        problem = problem or "its per-expert tensors do not concatenate into one matrix per expert"
    if problem:
        return FusedParameter(name, (), (), problem)
    parts, offset = [], 0
    for names in lists:
        size = shapes[names[0]][axis]
        parts += [ExpertPart(t, e, axis, offset, offset + size) for e, t in enumerate(names)]
        offset += size
    first = tuple(shapes[lists[0][0]])
    matrix = (offset, first[1]) if axis == 0 else (first[0], offset)
    return FusedParameter(name, (len(lists[0]), *matrix), tuple(parts))


def slice_specs(spec: Spec, fused: FusedParameter) -> list[tuple[str, Spec]]:
    """(per-expert checkpoint tensor, its spec) for every part of ``fused`` that ``spec``'s delta reaches."""
    if not isinstance(spec, ExpertLowRankSpec) or spec.experts != fused.shape[0]:
        raise UnsupportedAdapterError(
            f"{spec.module}.{spec.tensor}: the checkpoint stores this parameter one tensor per expert and only LoRA "
            "with one factor pair per expert can be split onto them, so it cannot be merged exactly."
        )
    shared = {
        "module": spec.module, "tensor": spec.tensor, "a_key": spec.a_key, "b_key": spec.b_key,
        "experts": spec.experts, "rank": spec.rank, "scale": spec.scale, "alpha": spec.alpha,
        "transposed": spec.transposed,
    }  # fmt: skip
    return [
        (part.tensor, ExpertSliceSpec(**shared, expert=part.expert, axis=part.axis, start=part.start, stop=part.stop))
        for part in fused.parts
    ]
