"""Task heads an adapter brings with it (modules_to_save of a classification adapter).

PEFT trains sequence/token classification and QA adapters on the task's model class, which
initialises a head the base checkpoint may not have (a base saved as BertForMaskedLM) or has
with another number of labels; the trained head rides in the adapter as a modules_to_save
copy. The merged model therefore holds that head, names the task's class in
``architectures`` and, for classifiers, as many labels as the head has rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .checkpoint import BaseCheckpoint
from .errors import AdapterConfigError
from .layouts import meta_model
from .tensor_names import base_model_prefix

log = logging.getLogger(__name__)

# PEFT's classifier_module_names for these task types (peft_model.py), the QA head, and the heads of the
# encoder-decoder classifiers (BART, T5, mBART: BartForSequenceClassification.classification_head).
HEAD_MODULES = ("classifier", "score", "qa_outputs", "classification_head")
_PEFT_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
_TASK_MAPPINGS = {
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    # No PEFT task type: PEFT's image classification recipe saves modules_to_save=["classifier"] and no task.
    "IMAGE_CLS": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "AUDIO_CLS": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
}


def head_task(task_type: str | None, config: dict[str, Any]) -> str | None:
    """The task whose head a saved ``classifier`` belongs to: PEFT's task type where it names a head task of the
    model type; otherwise the task of the base's own head class (ViTForImageClassification), else the one head
    task transformers has for the model type (ViTModel: image classification). None when ambiguous."""
    model_type = str(config.get("model_type", ""))
    if task_type and (task_type not in _PEFT_HEAD_TASKS or task_architecture(task_type, model_type)):
        return task_type if task_type in _PEFT_HEAD_TASKS else None
    # No task_type, or one the model type has no class for (SEQ_CLS on ViT: PEFT trains it all the same).
    from transformers.models.auto import modeling_auto

    architectures = config.get("architectures") or []
    tasks = []
    for task, mapping in _TASK_MAPPINGS.items():
        names = getattr(modeling_auto, mapping).get(model_type)
        if names is None:
            continue
        if any(a == names or (isinstance(names, (tuple, list)) and a in names) for a in architectures):
            return task
        tasks.append(task)
    return tasks[0] if len(tasks) == 1 else None


def head_tasks_of(model_type: str) -> list[str]:
    """Every head task transformers has a class for with this model type (bert: SEQ_CLS, TOKEN_CLS, QUESTION_ANS)."""
    return [task for task in _TASK_MAPPINGS if task_architecture(task, model_type)]


def untyped_head_error(tensor: str, task_type: str | None, config: dict[str, Any]) -> AdapterConfigError | None:
    """The refusal for a head the base lacks when no task_type says which of the model type's heads it is."""
    tasks = head_tasks_of(str(config.get("model_type", "")))
    if task_type or tensor.split(".", 1)[0] not in HEAD_MODULES or len(tasks) < 2:
        return None
    return AdapterConfigError(
        f"The adapter saves a {tensor.split('.', 1)[0]} head that the base lacks and names no task_type, and "
        f"{config.get('model_type')} has a head for each of {', '.join(tasks)}: set task_type in "
        "adapter_config.json to the task it was trained for."
    )


def is_task_head(tensor: str, task: str | None) -> bool:
    """A tensor of the head of ``task`` (head_task; e.g. ``classifier.weight``, ``classifier.out_proj.bias``)."""
    return task in _TASK_MAPPINGS and tensor.split(".", 1)[0] in HEAD_MODULES


def class_parameters(task: str | None, config_dir: Path, model_type: str) -> frozenset[str]:
    """Parameter names of transformers' class for ``task`` built from the base's config.json on the meta device
    (BART's ``classification_head.*``, wav2vec2's ``projector.*``, DeBERTa's ``pooler.*``); empty when unknown."""
    architecture = task_architecture(task, model_type)
    try:
        model = meta_model(config_dir, architecture) if architecture else None
    except Exception as exc:  # noqa: BLE001 - without the class, the head is known by its module name only
        log.debug("no %s class for %s: %s", task, config_dir, exc)
        return frozenset()
    if model is None:
        return frozenset()
    # Tied copies (BART's encoder/decoder embeddings are model.shared) are stored once, under their source's name.
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return frozenset(name for name, _ in model.named_parameters() if name not in tied)


def gained_by_head(tensor: str, task: str | None, base: BaseCheckpoint, *, task_type: str | None) -> bool:
    """A tensor the base lacks that the task's class has: the adapter's saved head (or pooler, projector) that
    the merged model gains. A head whose task no task_type settles is refused (untyped_head_error)."""
    if is_task_head(tensor, task) or tensor in class_parameters(task, base.path, base.model_type):
        return True
    error = untyped_head_error(tensor, task_type, base.config)
    if error is not None:
        raise error
    return False


def unfilled_warnings(
    task: str | None,
    config: dict[str, Any],
    *,
    config_dir: Path,
    saved: Iterable[str],
    resolve: Callable[[str], str | None],
) -> list[str]:
    """The task class's parameters that neither the base nor the adapter holds, as a warning: transformers draws them
    at random on every load (DeBERTa's pooler when the adapter saved only the classifier), as PEFT did too."""
    kept, prefix = set(saved), f"{base_model_prefix(config)}."
    missing = sorted(
        n
        for n in class_parameters(task, config_dir, str(config.get("model_type", "")))
        # A bare base (Wav2Vec2Model) names wav2vec2.masked_spec_embed without the head class's prefix.
        if n not in kept and resolve(n) is None and not (n.startswith(prefix) and resolve(n.removeprefix(prefix)))
    )
    if not missing:
        return []
    more = f" and {len(missing) - 2} more" if len(missing) > 2 else ""
    return [
        f"{(config.get('architectures') or ['The merged model'])[0]} needs {', '.join(missing[:2])}{more}, which "
        "neither the base nor the adapter holds: transformers initialises it at random on every load (PEFT did "
        "too), so its outputs change from load to load; retrain with those modules in modules_to_save."
    ]


def head_output(tensors: Iterable[str], task: str | None) -> str | None:
    """The weight of the head's output layer: ``classifier.weight`` or ``classifier.out_proj.weight``."""
    return output_layer(t for t in tensors if is_task_head(t, task))


def output_layer(tensors: Iterable[str]) -> str | None:
    """Among a head's tensors, the weight whose rows are the labels: RoBERTa's and ELECTRA's heads are a
    dense layer (hidden rows) then ``out_proj``; BERT's is one ``classifier`` layer."""
    weights = [t for t in tensors if t.split(".", 1)[0] in HEAD_MODULES and t.endswith(".weight")]
    for candidate in (w for w in weights if w.endswith("out_proj.weight")):
        return candidate
    return next((w for w in weights if w.count(".") == 1), None)


def task_architecture(task: str | None, model_type: str) -> str | None:
    """transformers' class for the task and model type, e.g. ('SEQ_CLS', 'bert') -> 'BertForSequenceClassification'."""
    if task not in _TASK_MAPPINGS:
        return None
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, _TASK_MAPPINGS[task]).get(model_type)
    return names[0] if isinstance(names, (tuple, list)) else names


def apply_head(config: dict[str, Any], *, task: str | None, head_rows: int | None, notes: list[str]) -> None:
    """Name the task's class and label count in ``config`` for a head that came with the adapter."""
    architecture = task_architecture(task, str(config.get("model_type", "")))
    if architecture and config.get("architectures") != [architecture]:
        notes.append(f"architectures -> {architecture}: the adapter brings its {task} head.")
        config["architectures"] = [architecture]
    if task == "SEQ_CLS" and config.get("pad_token_id") is None:
        # Decoder classifiers find each sequence's last token through it; training set it, the adapter lacks it.
        notes.append(
            f"config.json has no pad_token_id: set it to your tokenizer's pad token id so {architecture or 'the model'}"
            " can classify padded batches (it finds each sequence's end through it)."
        )
    if task == "QUESTION_ANS" or head_rows is None:
        return
    labels = config.get("id2label") or {}
    if len(labels) != head_rows:
        notes.append(f"{head_rows} labels (LABEL_0 ...) to match the adapter's head; rename them in config.json.")
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(head_rows)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(head_rows)}
        config.pop("num_labels", None)
