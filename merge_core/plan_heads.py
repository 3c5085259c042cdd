"""Task heads an adapter brings with it (modules_to_save of a classification adapter).

PEFT trains sequence/token classification and QA adapters on the task's model class, which
initialises a head the base checkpoint may not have (a base saved as BertForMaskedLM) or has
with another number of labels; the trained head rides in the adapter as a modules_to_save
copy. The merged model therefore holds that head, names the task's class in
``architectures`` and, for classifiers, as many labels as the head has rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# PEFT's classifier_module_names for these task types (peft_model.py) plus the QA head.
HEAD_MODULES = ("classifier", "score", "qa_outputs")
_TASK_MAPPINGS = {
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}


def is_task_head(tensor: str, task_type: str | None) -> bool:
    """A tensor of the head PEFT adds for ``task_type`` (e.g. ``classifier.weight``, ``classifier.out_proj.bias``)."""
    return task_type in _TASK_MAPPINGS and tensor.split(".", 1)[0] in HEAD_MODULES


def head_output(tensors: Iterable[str], task_type: str | None) -> str | None:
    """The weight of the head's output layer: ``classifier.weight`` or ``classifier.out_proj.weight``."""
    weights = [t for t in tensors if is_task_head(t, task_type) and t.endswith(".weight")]
    for candidate in (w for w in weights if w.endswith("out_proj.weight")):
        return candidate
    return next((w for w in weights if w.count(".") == 1), None)


def task_architecture(task_type: str | None, model_type: str) -> str | None:
    """transformers' class for the task and model type, e.g. ('SEQ_CLS', 'bert') -> 'BertForSequenceClassification'."""
    if task_type not in _TASK_MAPPINGS:
        return None
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, _TASK_MAPPINGS[task_type]).get(model_type)


def apply_head(config: dict[str, Any], *, task_type: str | None, head_rows: int | None, notes: list[str]) -> None:
    """Name the task's class and label count in ``config`` for a head that came with the adapter."""
    architecture = task_architecture(task_type, str(config.get("model_type", "")))
    if architecture and config.get("architectures") != [architecture]:
        notes.append(f"architectures -> {architecture}: the adapter brings its {task_type} head.")
        config["architectures"] = [architecture]
    if task_type == "QUESTION_ANS" or head_rows is None:
        return
    labels = config.get("id2label") or {}
    if len(labels) != head_rows:
        notes.append(f"{head_rows} labels (LABEL_0 ...) to match the adapter's head; rename them in config.json.")
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(head_rows)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(head_rows)}
        config.pop("num_labels", None)
