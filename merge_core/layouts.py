"""Checkpoint layout vs model layout: the names transformers gives checkpoint tensors on load.

A checkpoint on disk keeps the names it was saved with (``model.layers.*`` for Qwen2.5-VL,
``backbone.layers.*`` for Nemotron-H), while the model class of the running transformers
names its modules differently (``model.language_model.layers.*``, ``model.layers.*``), and
PEFT adapters are named after the modules. transformers renames checkpoint keys on load with
its conversion mapping; we ask it for the same renaming, on a model built on the meta device
(no memory, no weights), so an adapter's names resolve to the base's tensors for every
layout transformers itself can load. The merged checkpoint keeps the base's names.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def _model_class(config) -> type | None:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type):
            return cls
    return None


def meta_model(config_dir: Path, architecture: str | None = None):
    """The model class named by config.json (or transformers' class ``architecture``, e.g. the head class a task
    adapter makes of the base), instantiated without memory; None when not possible.

    One plan asks for it up to three times (names, transposed experts, expert layout): it is built once per
    config.json as it is on disk, and only read, never changed, by its callers.
    """
    config_file = Path(config_dir) / "config.json"
    stat = config_file.stat()
    return _meta_model_of(str(config_file.resolve()), stat.st_mtime_ns, stat.st_size, architecture)


@functools.lru_cache(maxsize=4)
def _meta_model_of(config_file: str, _mtime_ns: int, _size: int, architecture: str | None):
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(config_file).parent)
    cls = getattr(transformers, architecture, None) if architecture else _model_class(config)
    if not isinstance(cls, type):
        return None
    with torch.device("meta"):
        return cls(config)


def model_names(config_dir: Path, checkpoint_names: Iterable[str]) -> dict[str, str]:
    """{name in the model class: checkpoint name} for every tensor transformers renames on load.

    Tensors that transformers would fuse or split (weight converters, e.g. per-expert MoE
    weights into one parameter) are left out: no per-module adapter can address them.
    Returns {} when the class cannot be built here (custom code, unknown architecture).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        model = meta_model(config_dir)
        if model is None:
            return {}
        transforms = get_model_conversion_mapping(model)
        state = model.state_dict()
    except Exception as exc:  # noqa: BLE001 - any failure means "use the names as they are"
        log.debug("no layout mapping for %s: %s", config_dir, exc)
        return {}
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamed: dict[str, str] = {}
    for name in checkpoint_names:
        new, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if converted is None and new != name:
            renamed[new] = name
    return renamed


def transposed_parameter_modules(config_dir: Path, modules: Iterable[str]) -> set[str]:
    """The modules among ``modules`` (model-class names) whose 3-D expert parameters are stored transposed.

    transformers marks such expert modules with ``is_transposed`` (gpt-oss); PEFT's ParamWrapper reads it.
    """
    try:
        model = meta_model(config_dir)
    except Exception as exc:  # noqa: BLE001 - without the class, nothing is known to be transposed
        log.debug("no model class for %s: %s", config_dir, exc)
        return set()
    if model is None:
        return set()
    named = dict(model.named_modules())
    return {m for m in modules if getattr(named.get(m), "is_transposed", False)}


def shared_embeddings(config_dir: Path) -> dict[str, tuple[str, ...]]:
    """{source tensor: the tensors transformers ties to it} where one matrix serves two or more other modules
    (an encoder-decoder's shared embedding: encoder and decoder embeddings, and the output head), model-class names.

    The usual input/output embedding pair (one alias) is left out. Returns {} when the class cannot be built here.
    """
    try:
        model = meta_model(config_dir)
        tied = getattr(model, "all_tied_weights_keys", None) or {} if model is not None else {}
    except Exception as exc:  # noqa: BLE001 - without the class, nothing is known to be shared
        log.debug("no model class for %s: %s", config_dir, exc)
        return {}
    groups: dict[str, list[str]] = {}
    for alias, source in dict(tied).items():
        groups.setdefault(str(source), []).append(str(alias))
    return {source: tuple(sorted(aliases)) for source, aliases in groups.items() if len(aliases) >= 2}


def has_conv1d(config_dir: Path) -> bool | None:
    """Whether the model class has transformers' Conv1D layers (weights stored (in, out)); None when the class
    cannot be built here (custom code, unknown architecture)."""
    try:
        from transformers.pytorch_utils import Conv1D

        model = meta_model(config_dir)
    except Exception as exc:  # noqa: BLE001 - without the class, the layer types are unknown
        log.debug("no model class for %s: %s", config_dir, exc)
        return None
    if model is None:
        return None
    return any(isinstance(module, Conv1D) for module in model.modules())


def conv_settings(config_dir: Path, modules: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """{module: (dilation, padding_mode)} of the torch convolutions among ``modules`` (model-class names);
    None when the class cannot be built here (custom code, unknown architecture)."""
    try:
        model = meta_model(config_dir)
    except Exception as exc:  # noqa: BLE001 - without the class, the layers' settings are unknown
        log.debug("no model class for %s: %s", config_dir, exc)
        return None
    if model is None:
        return None
    import torch

    named = dict(model.named_modules())
    convs = {m: named.get(m) for m in modules}
    return {
        m: (tuple(conv.dilation), str(conv.padding_mode))
        for m, conv in convs.items()
        if isinstance(conv, torch.nn.modules.conv._ConvNd)
    }
