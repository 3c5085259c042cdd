"""Which modules PEFT wraps with LoRA for an adapter config, decided by PEFT's own matching code.

PEFT (``LoraModel.inject_adapter``) walks ``model.named_modules()`` and wraps every module its
config matches; ``PeftModel.from_pretrained`` then loads the adapter file with ``strict=False``,
so weights for modules the config does not match are ignored, and a config that matches nothing
is refused. We never build the model: the module names come from the base's tensor names (a
tensor's module is its name minus the last part; its ancestors are modules too), which equal
``named_modules()`` for checkpoints saved by transformers.

Namespace: PEFT matches names of the MODEL CLASS, which are also the adapter's module names
(its keys after ``base_model.model.``). Where transformers renames a checkpoint on load
(``layouts.model_names``, e.g. Qwen2.5-VL's ``model.layers`` -> ``model.language_model.layers``),
``BaseModules.from_tensors(..., renamed=...)`` names the modules as the class does, and
``select_lora_modules`` translates the checkpoint module each adapter module resolves to.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .adapter import AdapterConfig, LoraModule
from .errors import AdapterTargetError, AdapterWeightsError

# The keys of adapter_config.json that decide which modules PEFT wraps (target_parameters is refused earlier).
_TARGETING_KEYS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
# PeftModelForSequenceClassification / ForTokenClassification add their heads to modules_to_save before
# injecting, so LoRA never wraps them (peft_model.py, classifier_module_names).
# PEFT's classifier_module_names and qa_module_names: the heads its task models add to modules_to_save.
_HEADS_SAVED_BY_TASK = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# What transformers' get_output_embeddings() returns, by name: "all-linear" leaves it out.
_OUTPUT_EMBEDDINGS = ("lm_head", "embed_out", "lm_head.decoder", "cls.predictions.decoder", "proj_out")
# nn.Embedding modules that have a 2-D weight like nn.Linear; "all-linear" must not count them.
_EMBEDDING_LEAF = re.compile(r".*embed.*|wte|wpe|shared|relative_attention_bias")


@dataclass(frozen=True)
class BaseModules:
    """The base model's modules as PEFT sees them (``named_modules()``), derived from tensor names and shapes."""

    names: tuple[str, ...]  # every module but the root, parents before children
    weight_ndim: Mapping[str, int]  # module -> ndim of its own "weight" tensor
    owned: Mapping[str, frozenset[str]]  # module -> last name part of each tensor it holds itself
    parents: frozenset[str]  # modules that have submodules
    output_embedding: str | None  # the output head "all-linear" leaves out, e.g. "lm_head"

    renamed: Mapping[str, str] = field(default_factory=dict)  # checkpoint module -> its name in the model class

    @classmethod
    def from_tensors(
        cls, shapes: Mapping[str, Sequence[int]], *, renamed: Mapping[str, str] | None = None
    ) -> BaseModules:
        """Modules of a checkpoint given {tensor name: shape}, named as in the model class.

        Args:
            shapes: every tensor of the checkpoint, plus a tied ``lm_head.weight`` that it does not
                store (the planner's virtual tensor): the model still has an ``lm_head`` PEFT can match.
            renamed: {name in the model class: checkpoint name} for the tensors transformers renames
                on load (``layouts.model_names``); PEFT matches the class's names, so these are used.
        """
        to_model = {checkpoint: name for name, checkpoint in (renamed or {}).items()}
        owned: dict[str, set[str]] = {}
        weight_ndim: dict[str, int] = {}
        modules_renamed: dict[str, str] = {}
        for checkpoint_name, shape in shapes.items():
            if _is_tensor_state(checkpoint_name.rpartition(".")[0], shapes):
                continue  # quantization side tensors ("q_proj.weight.absmax") belong to no module of their own
            name = to_model.get(checkpoint_name, checkpoint_name)
            module, _, leaf = name.rpartition(".")
            if not module:
                continue
            if name != checkpoint_name:
                modules_renamed[checkpoint_name.rpartition(".")[0]] = module
            owned.setdefault(module, set()).add(leaf)
            if leaf == "weight":
                weight_ndim[module] = len(shape)
        names: set[str] = set()
        for module in owned:
            parts = module.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        return cls(
            names=tuple(sorted(names, key=lambda n: (n.count("."), n))),
            weight_ndim=weight_ndim,
            owned={m: frozenset(leaves) for m, leaves in owned.items()},
            parents=frozenset(n.rpartition(".")[0] for n in names if "." in n),
            output_embedding=next((n for n in _OUTPUT_EMBEDDINGS if weight_ndim.get(n) == 2), None),
            renamed=modules_renamed,
        )

    def model_name(self, checkpoint_module: str) -> str:
        """The model-class name of a checkpoint module (the planner resolves adapter names to checkpoint names)."""
        return self.renamed.get(checkpoint_module, checkpoint_module)

    def is_lora_layer(self, name: str) -> bool:
        """Whether LoRA can wrap the module: Linear, Conv1D, Embedding, ConvNd (a weight of 2+ dims), or MHA."""
        return self.weight_ndim.get(name, 0) >= 2 or "in_proj_weight" in self.owned.get(name, ())

    def is_linear(self, name: str) -> bool:
        """Whether the module is an nn.Linear or Conv1D, the layers "all-linear" expands to."""
        leaf = name.rpartition(".")[2]
        return self.weight_ndim.get(name) == 2 and name not in self.parents and not _EMBEDDING_LEAF.fullmatch(leaf)

    def kind(self, name: str) -> str:
        if self.weight_ndim.get(name) == 1:
            return "a normalization layer"
        if name in self.parents and name not in self.owned:
            return "a block of layers"
        return "no Linear, Embedding or convolution layer"


def _is_tensor_state(module: str, shapes: Mapping[str, Sequence[int]]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[: i + 1]) in shapes for i in range(len(parts)))


@dataclass(frozen=True)
class TargetSelection:
    """The adapter's LoRA modules PEFT applies, and those whose weights it ignores."""

    applied: dict[str, LoraModule]  # adapter module name -> its tensors, as in AdapterWeights.lora_modules
    ignored: tuple[str, ...]  # adapter module names the config does not target
    targeted: frozenset[str]  # base modules PEFT wraps (some may have no weights in the file: their delta is 0)

    def note(self) -> str | None:
        """The warning for the report when the file holds weights PEFT does not load."""
        if not self.ignored:
            return None
        shown = ", ".join(self.ignored[:3]) + (f" and {len(self.ignored) - 3} more" if len(self.ignored) > 3 else "")
        return (
            f"The adapter file holds weights for {len(self.ignored)} module(s) its config does not target ({shown}); "
            "PEFT ignores them, so this merge does too."
        )


def targeted_modules(config: AdapterConfig, modules: BaseModules, *, model_type: str) -> set[str]:
    """The base modules PEFT wraps with LoRA for ``config`` (PEFT's matching, run on ``modules.names``).

    Raises AdapterTargetError where PEFT refuses the config: nothing matches, every match is
    excluded, no target_modules and no default for ``model_type``, or a match LoRA cannot wrap.
    """
    peft_config = _peft_config(config, modules, model_type=model_type, hint=())
    return _targeted(peft_config, config, modules, model_type=model_type)


def select_lora_modules(
    config: AdapterConfig,
    lora_modules: Mapping[str, LoraModule],
    *,
    modules: BaseModules,
    model_type: str,
    resolved: Mapping[str, str | None] | None = None,
) -> TargetSelection:
    """Split the adapter's LoRA modules into those PEFT applies and those it ignores.

    Args:
        lora_modules: ``AdapterWeights.lora_modules`` (adapter-side module names).
        modules: the base's modules, in the model class's namespace.
        resolved: adapter module name -> the checkpoint module it resolves to (the planner's
            resolution, without ".weight"); a name missing here (or None) is matched as it is.
    Returns a TargetSelection; a module the config targets but the base lacks is kept in
    ``applied`` so the planner can report the mismatch. Raises AdapterTargetError as
    ``targeted_modules`` does.
    """
    leaves = sorted({name.rpartition(".")[2] for name in lora_modules})
    peft_config = _peft_config(config, modules, model_type=model_type, hint=leaves)
    targeted = _targeted(peft_config, config, modules, model_type=model_type)
    known = set(modules.names)
    applied: dict[str, LoraModule] = {}
    ignored: list[str] = []
    for name, module in lora_modules.items():
        checkpoint_module = (resolved or {}).get(name)
        base = modules.model_name(checkpoint_module) if checkpoint_module else name
        wanted = base in targeted if base in known else _matches(peft_config, name)
        if wanted:
            applied[name] = module
        else:
            ignored.append(name)
    return TargetSelection(applied=applied, ignored=tuple(sorted(ignored)), targeted=frozenset(targeted))


def saved_module_names(config: AdapterConfig) -> list[str]:
    """modules_to_save as the PeftModel applies it: the config's names, plus the task's heads for classifiers."""
    return [*config.modules_to_save, *_HEADS_SAVED_BY_TASK.get(str(config.task_type), ())]


def check_saved_modules(
    config: AdapterConfig,
    *,
    tensors: Sequence[str],
    shipped: frozenset[str],
    renamed: Mapping[str, str] | None = None,
    file_name: str = "The adapter file",
) -> None:
    """Refuse where PEFT would: every module modules_to_save matches must come with all its tensors in the file.

    PEFT (_set_trainable) wraps each module whose name ends with a modules_to_save entry, then looks each of its
    tensors up in the file by its plain name (set_peft_model_state_dict) and raises KeyError for one not there.

    Args:
        tensors: the base's tensors (checkpoint names, a tied lm_head included); quantization side tensors left out.
        shipped: the checkpoint tensors the adapter's full copies replace.
        renamed: {name in the model class: checkpoint name} where transformers renames on load.
    """
    names = saved_module_names(config)
    to_model = {checkpoint: name for name, checkpoint in (renamed or {}).items()}
    for tensor in tensors:
        wrapped = wrapped_module(to_model.get(tensor, tensor), names)
        if wrapped is None or tensor in shipped:
            continue
        entry = next(n for n in names if wrapped.endswith(n))
        raise AdapterWeightsError(
            f"modules_to_save makes PEFT load a full copy of {wrapped}, but {file_name} holds no {tensor}, so PEFT "
            f'refuses to load the adapter (KeyError); save it again with PEFT, or remove "{entry}" from '
            "modules_to_save in adapter_config.json if that layer was not trained."
        )


def wrapped_module(tensor: str, names: Sequence[str]) -> str | None:
    """The module PEFT wraps for modules_to_save (``names``, saved_module_names) that holds ``tensor``: the
    outermost one whose name ends with an entry; None when PEFT wraps none of its modules."""
    parts = tensor.split(".")[:-1]
    return next((m for m in (".".join(parts[: i + 1]) for i in range(len(parts))) if _saved(m, names)), None)


def _saved(module: str, names: Sequence[str]) -> bool:
    return any(module.endswith(name) for name in names)  # PEFT's own test: a plain suffix, no dot needed


# --- PEFT's steps, in the order inject_adapter runs them --------------------------------------------------------


def _targeted(peft_config: Any, config: AdapterConfig, modules: BaseModules, *, model_type: str) -> set[str]:
    """inject_adapter's matching loop and its refusals (NoMatchingPeftModuleError, unsupported layer)."""
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    matched, excluded, unmatched = [], [], []
    for name in modules.names:
        found = check_target_module_exists(peft_config, name)
        (excluded if isinstance(found, _ExcludedModule) else matched if found else unmatched).append(name)
    if not matched:
        raise AdapterTargetError(_no_match_message(config, peft_config, excluded=bool(excluded), model_type=model_type))
    unsupported = [name for name in matched if not modules.is_lora_layer(name)]
    if unsupported:
        name = unsupported[0]
        raise AdapterTargetError(
            f"PEFT refuses this adapter: its target_modules match {name}, which is {modules.kind(name)}, and LoRA "
            "wraps only Linear, Embedding and convolution layers; narrow target_modules in adapter_config.json."
        )
    return set(matched)


def _matches(peft_config: Any, name: str) -> bool:
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    found = check_target_module_exists(peft_config, name)
    return bool(found) and not isinstance(found, _ExcludedModule)


def _peft_config(config: AdapterConfig, modules: BaseModules, *, model_type: str, hint: Sequence[str]) -> Any:
    """A LoraConfig holding only the targeting keys, prepared as inject_adapter prepares it."""
    from peft import LoraConfig

    kwargs = {key: config.raw[key] for key in _TARGETING_KEYS if config.raw.get(key) is not None}
    saved = saved_module_names(config)
    if saved:
        kwargs["modules_to_save"] = saved
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:  # LoraConfig.__post_init__'s own checks
        reason = str(exc).strip().rstrip(".").replace("`", "")
        raise AdapterTargetError(
            f"PEFT refuses this adapter_config.json ({reason}); correct those keys in the file."
        ) from exc
    if peft_config.target_modules is None:
        peft_config.target_modules = _default_targets(model_type, hint)
    _expand_all_linear(peft_config, modules, task_type=config.task_type)
    _condense(peft_config, modules)
    return peft_config


def _default_targets(model_type: str, hint: Sequence[str]) -> set[str] | str:
    """LoraModel._prepare_adapter_config: the model type's default targets, or PEFT's refusal."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(model_type)
    if targets is None:
        example = ", ".join(f'"{leaf}"' for leaf in hint) or '"q_proj", "v_proj"'
        raise AdapterTargetError(
            f"adapter_config.json has no target_modules and PEFT has no default targets for model type "
            f'{model_type!r}, so PEFT refuses to load it; add "target_modules": [{example}] (the layers the '
            "adapter was trained on) to the file."
        )
    return targets if isinstance(targets, str) else set(targets)


def _expand_all_linear(peft_config: Any, modules: BaseModules, *, task_type: str | None) -> None:
    """tuners_utils._maybe_include_all_linear_layers: every Linear/Conv1D but the output head."""
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES

    targets = peft_config.target_modules
    if not (isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    head = modules.output_embedding
    if head is None and task_type == "SEQ_CLS":
        head = next((name for name in SEQ_CLS_HEAD_NAMES if name in modules.names), None)
    peft_config.target_modules = {name for name in modules.names if modules.is_linear(name) and name != head}


def _condense(peft_config: Any, modules: BaseModules) -> None:
    """inject_adapter's shortening of long target lists; it changes how layers_to_transform applies."""
    from peft.tuners.tuners_utils import _find_minimal_target_modules
    from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION

    targets = peft_config.target_modules
    if not isinstance(targets, (list, set)) or len(targets) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return
    suffixes = tuple("." + suffix for suffix in targets)
    others = [name for name in ("", *modules.names) if name not in targets and not name.endswith(suffixes)]
    condensed = _find_minimal_target_modules(targets, others)
    if len(condensed) < len(targets):
        peft_config.target_modules = condensed


def _no_match_message(config: AdapterConfig, peft_config: Any, *, excluded: bool, model_type: str) -> str:
    """PEFT's NoMatchingPeftModuleError reasons (inject_adapter), in plain words, with what to do."""
    raw = config.raw.get("target_modules")
    shown = _targets_text(raw)
    if raw is None:
        shown = f"{_targets_text(peft_config.target_modules)} (PEFT's defaults for {model_type})"
    layers = config.raw.get("layers_to_transform")
    pattern = config.raw.get("layers_pattern")
    where = f" in layers {layers!r}" if layers is not None else ""
    where += f" (layers_pattern {pattern!r})" if pattern else ""
    if excluded:
        return (
            f"PEFT refuses this adapter: no module of the base model is both matched by target_modules {shown}{where} "
            "and left free by exclude_modules and modules_to_save; correct those keys in adapter_config.json."
        )
    if raw is not None and not peft_config.target_modules:
        return (
            "PEFT refuses this adapter: its target_modules is empty, so it adapts no module; list the layers the "
            "adapter was trained on in adapter_config.json."
        )
    return (
        f"PEFT refuses this adapter: its target_modules {shown} match no module of the base model{where}; make sure "
        "this is the base the adapter was trained for, or correct target_modules in adapter_config.json."
    )


def _targets_text(targets: Any) -> str:
    """target_modules as written in adapter_config.json (no repr escaping), long lists shortened."""
    if isinstance(targets, str):
        return f'"{targets}"'
    names = sorted(targets)
    shown = ", ".join(f'"{name}"' for name in names[:4])
    return f"[{shown}{f', … {len(names) - 4} more' if len(names) > 4 else ''}]"


__all__ = [
    "BaseModules",
    "TargetSelection",
    "check_saved_modules",
    "saved_module_names",
    "select_lora_modules",
    "targeted_modules",
    "wrapped_module",
]
