"""The merge plan: every decision about the merge, made from metadata before any data moves.

Building a plan reads adapter_config.json, the adapter's tensors (small), the base's
config.json and safetensors headers. It never reads base tensor data and never writes;
every mismatch between adapter and base surfaces here as a specific exception. The steps:
targets (which base tensor each adapter module changes), tying (whether a tied lm_head must
become a tensor of its own), tensors (what each output tensor is made of), vocabulary, shards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from .adapter import AdapterConfig, AdapterWeights, load_adapter_config, load_adapter_weights
from .checkpoint import BaseCheckpoint, BaseTensor, load_base_checkpoint
from .errors import UnsupportedAdapterError
from .formats import refuse_foreign
from .layouts import has_conv1d, model_names, shared_embeddings
from .mismatch import Blame
from .options import COMPUTE_DTYPES, DEFAULT_MAX_SHARD_BYTES, OUTPUT_DTYPES, MergeOptions, dtype_name, parse_size
from .peft_keys import is_wrapper_copy, wrapper_only_copy
from .peft_types import uses_registry
from .plan_copies import loaded_by_peft, refuse_quantized_copy, token_rows
from .plan_heads import apply_head, gained_by_head, head_output, head_task, is_task_head, unfilled_warnings
from .plan_lora import CONV1D_MODEL_TYPES, LoraTarget, check_conv_targets, plan_lora_module, weights_transposed
from .plan_output import TOKENIZER_FILES, check_vocab, files_to_copy, output_config, shard
from .plan_registry import registry_plans
from .plan_types import DoraSpec, LowRankDelta, MergePlan, ModulePlan, OutputTensorPlan
from .safetensors_io import ST_FROM_DTYPE, PlannedTensor
from .targets import BaseModules, check_saved_modules, select_lora_modules
from .tensor_names import OUTPUT_EMBEDDING_NAME, base_model_prefix, input_embedding, resolve_tensor

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class _Inputs:
    """What every planning step reads: the two checkpoints, the options and the message context."""

    base: BaseCheckpoint
    config: AdapterConfig
    adapter: AdapterWeights
    options: MergeOptions
    blame: Blame
    embed: str | None
    virtual: dict[str, BaseTensor]  # a tied lm_head that is no tensor of its own, seen as the embedding

    _model_names: dict[str, str] | None = None

    def resolve(self, name: str) -> str | None:
        """The base tensor an adapter-side name refers to, in the checkpoint's own layout."""
        known = self.base.tensors.keys() | self.virtual.keys()
        if name in known:
            return name
        if self._model_names is None:  # built only when a name is not found as it is
            self._model_names = model_names(self.base.path, self.base.tensors)
        if name in self._model_names:
            return self._model_names[name]
        found = resolve_tensor(name, known, self._model_prefix)
        if found is None and self._model_names:
            alias = resolve_tensor(name, self._model_names.keys())
            found = self._model_names[alias] if alias is not None else None
        return found

    @functools.cached_property
    def _model_prefix(self) -> str | None:
        return base_model_prefix(self.base.config)

    def not_found(self, module: str, tensor: str):
        return self.blame.not_found(module, tensor, list(self.base.tensors))

    def fan_in_fan_out(self) -> bool:
        """The config's fan_in_fan_out as PEFT applies it: PEFT resets it to the layer's type (true only on
        transformers' Conv1D), so a "true" on a model built of nn.Linear layers changes nothing."""
        if not self.config.fan_in_fan_out or self.base.model_type in CONV1D_MODEL_TYPES:
            return self.config.fan_in_fan_out
        return has_conv1d(self.base.path) is not False  # an unknown class keeps the config's word


def _inputs(base: BaseCheckpoint, config: AdapterConfig, adapter: AdapterWeights, options: MergeOptions) -> _Inputs:
    embed = input_embedding(base)
    virtual: dict[str, BaseTensor] = {}
    if base.tie_word_embeddings and OUTPUT_EMBEDDING_NAME not in base.tensors and embed is not None:
        # The head shares the embedding matrix; it only becomes a tensor of its own if the
        # adapter changes one side and not the other (decided in _untie).
        virtual[OUTPUT_EMBEDDING_NAME] = base.tensors[embed]
    blame = Blame(
        config.base_model_name_or_path,
        options.base_name or base.display_name,
        chosen_name=options.base_name or base.name,
        task_type=config.task_type,
    )
    return _Inputs(base, config, adapter, options, blame, embed, virtual)


def output_dtype(base: BaseCheckpoint, options: MergeOptions) -> str:
    return base.dominant_float_dtype() if options.dtype == "auto" else OUTPUT_DTYPES[options.dtype]


def _starts(inp: _Inputs, out_dtype: str) -> dict[str, PlannedTensor]:
    """Each output tensor's starting name, dtype and shape; a quantized weight starts as the float it decodes to."""
    quant = inp.base.quant
    starts: dict[str, PlannedTensor] = {}
    for name, t in {**inp.base.tensors, **inp.virtual}.items():
        if quant is not None and name in quant.auxiliary:
            continue  # scales, absmax, quant states: they vanish with the quantization
        if quant is not None and name in quant.tensors:
            shape = quant.tensors[name].shape
            assert shape is not None  # load_base_checkpoint resolves every shape
            starts[name] = PlannedTensor(name, out_dtype, shape)
        else:
            starts[name] = PlannedTensor(name, t.info.dtype, t.info.shape)
    return starts


def _replacements(
    inp: _Inputs, starts: dict[str, PlannedTensor], notes: list[str], *, task: str | None
) -> dict[str, str]:
    """Full tensors the adapter ships (modules_to_save, resized embeddings): base tensor -> adapter key.
    ``task``: the head task (plan_heads.head_task) a saved head belongs to."""
    replaced: dict[str, str] = {}
    for module_tensor, key in inp.adapter.replacements.items():
        if not loaded_by_peft(module_tensor, key, inp.config):
            notes.append(f"{key} is left out, as PEFT leaves it: modules_to_save does not name its module.")
            continue
        if is_wrapper_copy(key):  # no copy under the plain name beside it (adapter.py prefers that one)
            raise wrapper_only_copy(inp.adapter.file.name, key)
        target = inp.resolve(module_tensor)
        if target in inp.virtual and _tied_by_peft(inp) and ".base_layer." in key:
            continue  # PEFT's saved copy of the shared matrix; PEFT keeps lm_head tied to the embedding
        if target is None and gained_by_head(module_tensor, task, inp.base, task_type=inp.config.task_type):
            spec = inp.adapter.specs[key]  # a head the base lacks: the merged model gains it
            starts[module_tensor] = PlannedTensor(module_tensor, ST_FROM_DTYPE.get(spec.dtype, "F32"), spec.shape)
            replaced[module_tensor] = key
            continue
        if target is None:
            raise inp.not_found(module_tensor.rsplit(".", 1)[0], module_tensor)
        refuse_quantized_copy(inp.base, inp.adapter, target=target, key=key)
        spec, start = inp.adapter.specs[key], starts[target]
        if len(spec.shape) != len(start.shape) or spec.shape[1:] != start.shape[1:]:
            raise inp.blame.mismatch(
                f"The adapter's saved copy of {target} has shape {list(spec.shape)}, the base's is {list(start.shape)}."
            )
        resizable = start.shape[0] in token_rows(inp.base) or is_task_head(target, task)
        if spec.shape != start.shape and not resizable:
            raise inp.blame.mismatch(
                f"The adapter's saved copy of {target} has shape {list(spec.shape)}, the base's is "
                f"{list(start.shape)}; only a resized vocabulary or a task head with other labels changes size."
            )
        if spec.shape != start.shape and not is_task_head(target, task):  # a head's labels: apply_head notes them
            notes.append(
                f"{target}: the adapter resized it from {start.shape[0]} to {spec.shape[0]} rows (resized vocabulary)."
            )
        replaced[target] = key
        starts[target] = PlannedTensor(target, ST_FROM_DTYPE.get(spec.dtype, start.dtype), spec.shape)
    return replaced


def _lora_targets(inp: _Inputs, starts: dict[str, PlannedTensor], notes: list[str]) -> list[LoraTarget]:
    """The adapter's LoRA modules PEFT applies (its own matching rules), each with its base tensor."""
    resolved = {name: inp.resolve(f"{name}.weight") for name in inp.adapter.lora_modules}
    shapes = {name: start.shape for name, start in starts.items()}
    selection = select_lora_modules(
        inp.config,
        inp.adapter.lora_modules,
        model_type=inp.base.model_type,
        modules=BaseModules.from_tensors(shapes, renamed=inp._model_names or None),
        resolved={name: tensor.rsplit(".", 1)[0] if tensor else None for name, tensor in resolved.items()},
    )
    head = OUTPUT_EMBEDDING_NAME.removesuffix(".weight")
    if _tied_by_peft(inp) and head in selection.ignored:
        # PEFT wraps the tied lm_head with the embedding's own LoRA factors (transposed): the same delta, which the
        # shared matrix takes once. With DoRA the head has a magnitude (row norms) of its own, so a tensor of its own.
        ignored = tuple(n for n in selection.ignored if n != head)
        applied = dict(selection.applied)
        if inp.adapter.lora_modules[head].magnitude is not None:
            applied[head] = inp.adapter.lora_modules[head]
        else:
            notes.append(
                "lm_head's LoRA is the embedding's, tied by ensure_weight_tying: the shared matrix takes it once."
            )
        selection = replace(selection, applied=applied, ignored=ignored)
    note = selection.note()
    if note:
        notes.append(note)
    targets = []
    for name, module in selection.applied.items():
        tensor = resolved[name]
        if tensor is None:
            raise inp.not_found(name, f"{name}.weight")
        targets.append(LoraTarget(module, tensor))
    return targets


# The modules an encoder-decoder's one embedding matrix serves (T5, BART, Marian: shared, encoder and decoder
# embed_tokens, lm_head); only adapters that change one of these need the model class's tying map.
_SHARED_EMBEDDING_LEAVES = ("shared", "embed_tokens", "lm_head")


def _refuse_shared_embedding(inp: _Inputs) -> None:
    """Refuse an adapter that changes one module of a matrix the model shares among three or more modules, where
    the checkpoint does not store the others as tensors of their own (those are matrices of their own).

    PEFT wraps that module alone, so base + adapter changes one of them (or nothing, for T5's and BART's never-called
    ``shared``), while merge_and_unload changes the matrix for all; reproducing the first needs each module's
    matrix stored separately, which this tool does not write.
    """
    adapted = {f"{m}.weight" for m in [*inp.adapter.lora_modules, *_registry_modules(inp)]}
    adapted |= set(inp.adapter.replacements)
    if not any(name.rsplit(".", 2)[-2] in _SHARED_EMBEDDING_LEAVES for name in adapted if "." in name):
        return
    for source, aliases in shared_embeddings(inp.base.path).items():
        members = [source, *(a for a in aliases if a not in inp.base.tensors)]
        changed = sorted(n.removesuffix(".weight") for n in adapted if n in members)
        # One virtual alias (lm_head) of a matrix the model calls is the usual pair, stored apart when it changes;
        # several, or a change to the source that only its aliases call, have no such split.
        if changed and (len(members) > 2 or (source.removesuffix(".weight") in changed and len(members) > 1)):
            shown = ", ".join(m.removesuffix(".weight") for m in members)
            raise UnsupportedAdapterError(
                f"The adapter changes {changed[0]}, one of the modules that share one embedding matrix in this "
                f"{inp.base.model_type} model ({shown}): its merge needs each of them stored separately, which this "
                "tool does not write yet; use the adapter with PEFT on top of the base model."
            )


def _registry_modules(inp: _Inputs) -> list[str]:
    """The modules a merge_core.peft_types record plans (adapter names); none for the LoRA planner's adapters."""
    if not uses_registry(inp.config.raw):
        return []
    from .peft_types import record_for

    return list(record_for(inp.config.peft_type).parse_adapter(inp.adapter.specs))


def _registry_head(inp: _Inputs) -> set[str]:
    """A tied lm_head that a registry adapter changes with tensors of its own (its own trainable-token rows, LoHa,
    IA3, ...): PEFT changes the head alone, so, like a LoRA target, it needs a tensor of its own. The embedding's
    own trainable tokens are not listed: PEFT ties the head's rows to them."""
    head = OUTPUT_EMBEDDING_NAME
    if head not in inp.virtual:
        return set()
    return {head} if any(inp.resolve(f"{m}.weight") == head for m in _registry_modules(inp)) else set()


def _tied_by_peft(inp: _Inputs) -> bool:
    """ensure_weight_tying on a base whose lm_head is the embedding: PEFT ties lm_head's adapter to the embedding's
    (tuners_utils._check_tied_modules), so whatever the adapter does to one, it does to both."""
    return inp.config.ensure_weight_tying and OUTPUT_EMBEDDING_NAME in inp.virtual


def _untie(inp: _Inputs, touched: set[str], notes: list[str]) -> bool:
    """Whether a tied lm_head must be stored separately so the merge computes what base + adapter does."""
    if not inp.virtual:
        return False
    head_touched, embed_touched = OUTPUT_EMBEDDING_NAME in touched, inp.embed in touched
    if not (head_touched or embed_touched):
        return False
    if inp.config.ensure_weight_tying and not head_touched:
        notes.append("The adapter keeps input and output embeddings tied (ensure_weight_tying).")
        return False
    which = (
        "both differently"
        if head_touched and embed_touched
        else ("only lm_head" if head_touched else "only the input embedding")
    )
    notes.append(
        f"The base ties lm_head to the input embedding, but the adapter changes {which}; the merged model stores "
        "lm_head separately (tie_word_embeddings=false) so it computes exactly what base+adapter computes."
    )
    return True


def _tensor_plans(
    inp: _Inputs, starts: dict[str, PlannedTensor], replaced: dict[str, str], *, untie: bool, out_dtype: str
) -> dict[str, OutputTensorPlan]:
    """One plan per output tensor, in file order, starting from the base (or the adapter's copy)."""
    added = [n for n in replaced if n not in inp.base.tensors and n not in inp.virtual]
    order = [n for n in inp.base.tensors if n in starts] + added + ([OUTPUT_EMBEDDING_NAME] if untie else [])
    quantized = inp.base.quant.tensors if inp.base.quant is not None else {}
    plans: dict[str, OutputTensorPlan] = {}
    for name in order:
        start = starts[name]
        source = inp.base.tensors.get(name) or inp.virtual.get(name)
        plans[name] = OutputTensorPlan(
            name=name,
            dtype=out_dtype if start.dtype in _FLOAT_DTYPES else start.dtype,
            shape=start.shape,
            base=None if name in replaced else source,
            adapter_key=replaced.get(name),
            quantized=None if name in replaced else quantized.get(name),
        )
    return plans


def _module_plans(
    inp: _Inputs,
    plans: dict[str, OutputTensorPlan],
    replaced: dict[str, str],
    targets: list[LoraTarget],
    starts: dict[str, PlannedTensor],
) -> list[ModulePlan]:
    modules = [
        ModulePlan(target.rsplit(".", 1)[0], target, "replaced", "modules_to_save", plans[target].shape)
        for target in replaced
        if target in plans
    ]
    shapes = {name: start.shape for name, start in starts.items()}
    transposed = weights_transposed(
        inp.config, inp.adapter, targets, shapes, model_type=inp.base.model_type, fan_in_fan_out=inp.fan_in_fan_out()
    )
    for target in targets:
        if target.tensor not in plans:  # tied head left tied: the delta lands on the shared embedding
            target = LoraTarget(target.module, str(inp.embed))
        module, biases = plan_lora_module(
            target,
            plans[target.tensor],
            config=inp.config,
            adapter=inp.adapter,
            transposed_model=transposed,
            blame=inp.blame,
            base_tensors=inp.base.tensors.keys(),
        )
        modules.append(module)
        for bias in biases:
            plans[bias.bias_tensor].bias_deltas.append((bias.key, bias.scale))
    return modules


def plan_merge(
    base: BaseCheckpoint, adapter_config: AdapterConfig, adapter: AdapterWeights, options: MergeOptions
) -> MergePlan:
    """Every decision about merging ``adapter`` into ``base``, from metadata only."""
    inp = _inputs(base, adapter_config, adapter, options)
    _refuse_shared_embedding(inp)
    notes: list[str] = [base.quant.describe()] if base.quant is not None else []
    out_dtype = output_dtype(base, options)
    starts = _starts(inp, out_dtype)
    task = head_task(adapter_config.task_type, base.config)
    replaced = _replacements(inp, starts, notes, task=task)
    check_saved_modules(
        adapter_config,
        tensors=list(starts),
        shipped=frozenset(replaced),
        renamed=inp._model_names,
        file_name=adapter.file.name,
    )
    registry = uses_registry(adapter_config.raw)
    targets = [] if registry else _lora_targets(inp, starts, notes)
    untie = _untie(inp, set(replaced) | {t.tensor for t in targets} | _registry_head(inp), notes)
    plans = _tensor_plans(inp, starts, replaced, untie=untie, out_dtype=out_dtype)
    conv_warnings = check_conv_targets(base.path, targets, {name: start.shape for name, start in starts.items()})
    modules = _module_plans(inp, plans, replaced, targets, starts)
    if registry:
        modules += registry_plans(inp, starts, plans, notes)
    if untie or replaced:
        check_vocab(plans, inp.embed)
    vocab_delta = _vocab_delta(inp, plans)
    tensors = list(plans.values())
    config = output_config(_source_config(base), vocab_delta=vocab_delta, out_dtype=out_dtype, untie=untie, notes=notes)
    head = head_output(replaced, task)
    head_warnings: list[str] = []
    if head is not None:
        apply_head(config, task=task, head_rows=plans[head].shape[0], notes=notes)
        head_warnings = unfilled_warnings(task, config, config_dir=base.path, saved=replaced, resolve=inp.resolve)
    return MergePlan(
        base=base,
        adapter_config=adapter_config,
        adapter=adapter,
        options=options,
        output_dtype=out_dtype,
        tensors=tensors,
        shards=shard(tensors, options.max_shard_size),
        modules=modules,
        config=config,
        copy_files=files_to_copy(base.path, adapter.path, notes),
        notes=notes,
        warnings=_warnings(inp) + conv_warnings + head_warnings,
    )


def _vocab_delta(inp: _Inputs, plans: dict[str, OutputTensorPlan]) -> int:
    """Rows the adapter added to (or removed from) the input embedding. Some models keep more rows than
    vocab_size by design (Mllama: +8), so the config follows the change, not the row count."""
    if inp.embed is None or inp.embed not in plans or inp.embed not in inp.base.tensors:
        return 0
    return plans[inp.embed].shape[0] - inp.base.tensors[inp.embed].info.shape[0]


def _source_config(base: BaseCheckpoint) -> dict:
    """The config the output's starts from: without quantization_config, which would make it unloadable."""
    if base.quant is None:
        return base.config
    from .quant import plain_config

    return plain_config(base.config)


def _warnings(inp: _Inputs) -> list[str]:
    if not inp.blame.names_differ:
        return []
    warning = (
        f"The adapter names {inp.blame.declared!r} as its base, not {inp.blame.chosen!r}. "
        "All shapes match, so the merge went ahead; make sure this is the model you meant."
    )
    return [warning]


def build_plan(
    base: str | Path | BaseCheckpoint,
    adapter: str | Path,
    options: MergeOptions | None = None,
    *,
    check_finite: bool = True,
) -> MergePlan:
    """Validate base and adapter against each other and decide everything about the merge."""
    options = options or MergeOptions()
    adapter_path = Path(adapter)
    refuse_foreign(adapter_path)
    config = load_adapter_config(adapter_path)
    weights = load_adapter_weights(adapter_path, config)
    checkpoint = base if isinstance(base, BaseCheckpoint) else load_base_checkpoint(base, name=options.base_name)
    plan = plan_merge(checkpoint, config, weights, options)
    if check_finite:
        weights.check_finite()
    return plan


__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_MAX_SHARD_BYTES",
    "OUTPUT_DTYPES",
    "TOKENIZER_FILES",
    "DoraSpec",
    "LowRankDelta",
    "MergeOptions",
    "MergePlan",
    "ModulePlan",
    "OutputTensorPlan",
    "build_plan",
    "dtype_name",
    "output_dtype",
    "parse_size",
    "plan_merge",
]
