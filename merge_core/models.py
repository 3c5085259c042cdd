"""Loading PeftModel(base, adapter) and the merged model with the model class their task needs.

The class follows the adapter's ``task_type`` (PEFT's own task -> Auto class mapping, the one
``AutoPeftModelFor*`` uses) and the architecture named in config.json (Whisper is a speech
seq2seq model, ViT an image classifier, Qwen2-VL an image-text-to-text model). A model that
cannot be loaded raises ModelLoadError with one short sentence, never transformers' own text.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .model_lock import building_models
from .plan import MergePlan
from .plan_heads import output_layer
from .reference_adapter import adapter_for_model
from .safetensors_io import DTYPE_FROM_ST

# Task names past PEFT's six, for architectures whose head PEFT has no task type for.
SPEECH_SEQ_2_SEQ, IMAGE_CLS, AUDIO_CLS, IMAGE_TEXT_TO_TEXT, MASKED_LM = (
    "SPEECH_SEQ_2_SEQ",
    "IMAGE_CLS",
    "AUDIO_CLS",
    "IMAGE_TEXT_TO_TEXT",
    "MASKED_LM",
)
GENERATIVE_TASKS = ("CAUSAL_LM", IMAGE_TEXT_TO_TEXT)
SEQ2SEQ_TASKS = ("SEQ_2_SEQ_LM", SPEECH_SEQ_2_SEQ)
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", IMAGE_CLS, AUDIO_CLS, MASKED_LM)
FEATURE_TASKS = ("FEATURE_EXTRACTION",)
LABEL_TASKS = ("SEQ_CLS", "TOKEN_CLS", IMAGE_CLS, AUDIO_CLS)

# An architecture's task: the first transformers mapping that lists its exact class name. The
# order settles names listed twice (Gemma3ForConditionalGeneration is a causal LM and a VLM).
_ARCHITECTURE_TASKS = (
    (IMAGE_TEXT_TO_TEXT, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    (SPEECH_SEQ_2_SEQ, "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    (IMAGE_CLS, "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    (AUDIO_CLS, "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    (MASKED_LM, "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)
# Same seed for both loads: weights neither checkpoint holds get the same random values in both.
_INIT_SEED = 0


class MergedModelLoadError(ModelLoadError):
    """base + adapter loads but the merged folder does not: a defect of the merged model, not of the check."""


@dataclass(frozen=True)
class ModelChoice:
    """Which class loads the base and the merged model, and the task the checks follow."""

    task: str
    model_class: Any  # a transformers model class or Auto class
    reason: str  # why this class, for the table


@dataclass
class LoadedModels:
    peft: Any  # PeftModel(base, adapter), unmerged
    merged: Any
    tokenizer: Any
    device: torch.device
    merged_dtype: torch.dtype
    base_vocab: int  # rows of the base's token embedding; 0 for models without token input
    pad_token_id: int
    task: str = "CAUSAL_LM"
    model_class: str = ""
    chosen_because: str = ""  # ModelChoice.reason, shown in the table
    notes: list[str] = field(default_factory=list)  # e.g. weights initialised randomly in both

    def release(self) -> None:
        self.peft = self.merged = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# Share of the free memory two loaded models may take: activations, the tokenizer and the caches need the rest.
USABLE_SHARE = {"cuda": 0.8, "cpu": 0.6}
_LOAD_OVERHEAD = 512 << 20  # framework buffers and the forward pass's activations


@dataclass(frozen=True)
class MemoryFit:
    """Whether base + adapter and the merged model fit in ``device``'s free memory, and how to load them."""

    device: str  # "cuda" or "cpu"
    required: int  # bytes that must be free (the models' bytes over USABLE_SHARE)
    free: int

    @property
    def fits(self) -> bool:
        return self.required <= self.free

    @property
    def device_map(self) -> str | None:
        return placement(self.device).get("device_map")

    def sentence(self) -> str:
        where = "the GPU has" if self.device == "cuda" else "this machine has"
        return (
            f"needs about {self.required / 1e9:.1f} GB of memory (base + adapter and the merged model in "
            f"float32), and {where} {self.free / 1e9:.1f} GB free"
        )


def models_bytes(params: int, adapter_bytes: int, *, bytes_per_param: int = 4, models: int = 2) -> int:
    """Memory of ``models`` loaded copies at the compute dtype, each with the adapter, plus overhead."""
    return (params * bytes_per_param + adapter_bytes) * models + _LOAD_OVERHEAD


def placement(device: str | torch.device) -> dict[str, Any]:
    """from_pretrained's placement arguments: on a GPU each tensor goes from the safetensors file straight to
    the device (device_map), never whole in host RAM; on a CPU transformers loads as usual."""
    name = str(device)
    return {"device_map": name} if name.startswith("cuda") else {}


def memory_fit(needed: int, *, device: str, free: int) -> MemoryFit:
    """The load decision for ``needed`` bytes of models on ``device`` with ``free`` bytes free (pure)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return MemoryFit(kind, int(needed / USABLE_SHARE[kind]) + 1, int(free))


def free_memory(device: str) -> int:
    """Bytes free now: the GPU's (torch.cuda.mem_get_info) or the host's available RAM (psutil)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def architecture_task(architecture: str) -> str | None:
    """The task of a transformers class name (``WhisperForConditionalGeneration`` -> SPEECH_SEQ_2_SEQ)."""
    from transformers.models.auto import modeling_auto

    for task, mapping_name in _ARCHITECTURE_TASKS:
        for names in getattr(modeling_auto, mapping_name, {}).values():
            if architecture == names or (isinstance(names, (tuple, list)) and architecture in names):
                return task
    return None


def peft_task_auto_class(task_type: str) -> Any:
    """The transformers Auto class PEFT's ``AutoPeftModel`` loads for a task type, or None."""
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, auto

    peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
    for value in vars(auto).values():
        if isinstance(value, type) and getattr(value, "_target_peft_class", None) is peft_class is not None:
            target = getattr(value, "_target_class", None)
            if target is not None:
                return target
    return None


def choose_model_class(plan: MergePlan) -> ModelChoice:
    """The class for the base and the merged model, from the adapter's task type and config.json."""
    import transformers

    config = _load_config(plan.base.path)
    # The merged model's class: the base's, or the head class the adapter's head made it (plan_heads).
    arch_name = next(iter(plan.config.get("architectures") or getattr(config, "architectures", None) or []), None)
    arch_class = getattr(transformers, str(arch_name), None) if arch_name else None
    arch_task = architecture_task(str(arch_name)) if arch_class is not None else None
    task_type = str(plan.adapter_config.task_type or "").upper() or None
    auto_class = peft_task_auto_class(task_type) if task_type else None
    supported = auto_class is not None and type(config) in getattr(auto_class, "_model_mapping", {})
    # A head task (classification, features) decides the head; a generative task label is often copied
    # from a tutorial, so it only decides when config.json names no head of its own.
    if supported and (task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM") or arch_task in (None, "FEATURE_EXTRACTION")):
        return ModelChoice(task_type, auto_class, f"task_type {task_type} -> {auto_class.__name__}")
    if arch_task is not None:
        differs = task_type and task_type != arch_task
        why = f"{arch_name} in config.json" + (f" (task_type {task_type} does not fit it)" if differs else "")
        return ModelChoice(arch_task, arch_class, why)
    if arch_name:
        raise ModelLoadError(
            f"This transformers version has no model class {arch_name}, so the merged model "
            "cannot be run; the streamed checks above still cover every tensor."
        )
    raise ModelLoadError(
        "config.json names no architecture and the adapter no task_type, so the model class is "
        "unknown; the streamed checks above still cover every tensor."
    )


def load_models(
    plan: MergePlan, merged_dir: str | Path, *, device: str = "auto", dtype: torch.dtype = torch.float32
) -> LoadedModels:
    """Load PeftModel(base, adapter) and the merged model side by side, in ``dtype``, with the task's class.

    Raises ModelLoadError (one sentence) when the reference cannot be built, and MergedModelLoadError
    when the reference loads but the merged folder does not.
    """
    choice = choose_model_class(plan)
    dev = pick_device(device)
    notes: list[str] = []
    placed = placement(dev)
    with building_models():
        peft_model, base_vocab = _load_reference(plan, choice, dtype=dtype, notes=notes, placed=placed)
        try:
            merged = _from_pretrained(choice, Path(merged_dir), dtype=dtype, which="merged", notes=notes, config=placed)
        except ModelLoadError as exc:
            raise MergedModelLoadError(str(exc)) from exc
    tokenizer = _tokenizer(Path(merged_dir))
    pad = None
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedModels(
        _as_trained(plan, peft_model.to(dev).eval()),
        merged.to(dev).eval(),
        tokenizer,
        dev,
        DTYPE_FROM_ST[plan.output_dtype],
        base_vocab,
        pad if pad is not None else 0,
        task=choice.task,
        model_class=type(merged).__name__,
        chosen_because=choice.reason,
        notes=sorted(set(notes)),
    )


def _load_reference(
    plan: MergePlan, choice: ModelChoice, *, dtype: torch.dtype, notes: list[str], placed: dict[str, Any]
) -> tuple[Any, int]:
    """PeftModel(base, adapter), built the way training built it (resized vocabulary, resized head);
    ``placed`` holds from_pretrained's device_map (PEFT puts the adapter beside the base's weights)."""
    from peft import PeftModel

    labels = _label_count(plan, choice)
    base = _from_pretrained(
        choice,
        plan.base.path,
        dtype=dtype,
        which="base",
        notes=notes,
        # The adapter's own copy of a head (resized or new) replaces the base's, as in training.
        replaced={t.name for t in plan.tensors if t.adapter_key},
        config={**placed, **({"num_labels": labels} if labels else {})},
    )
    base = _dequantized(plan, base, dtype)
    base_vocab = token_vocab(base)
    merged_vocab = next((t.shape[0] for t in plan.tensors if t.adapter_key and t.name == _embed_name(plan)), None)
    if base_vocab and merged_vocab and merged_vocab != base_vocab:
        # The adapter was trained after resize_token_embeddings; PEFT needs the same shapes.
        base.resize_token_embeddings(merged_vocab, mean_resizing=False)
    try:
        with tempfile.TemporaryDirectory(prefix="lms-reference-") as workdir:
            adapter_dir, note = adapter_for_model(plan, base, Path(workdir))
            notes.extend([note] if note else [])
            return PeftModel.from_pretrained(base, adapter_dir), base_vocab
    except Exception as exc:
        raise ModelLoadError(
            f"PEFT could not load the adapter onto the base {choice.model_class.__name__} ({short_error(exc)})."
        ) from exc


def _dequantized(plan: MergePlan, base: Any, dtype: torch.dtype) -> Any:
    """A bitsandbytes base as transformers' dequantize() gives it (dequantize_4bit of the stored weights, where
    PEFT's own 4-bit merge starts too), every weight in ``dtype``.

    transformers loads a pre-quantized checkpoint in its own dtype whatever ``dtype`` asks (bfloat16 for the
    Hub's -bnb-4bit repos), so PeftModel on it computes in bfloat16 and misses a float32 comparison by ~5e-2.
    """
    from .quant import QuantKind

    quant = plan.base.quant
    bnb = {QuantKind.BNB_4BIT, QuantKind.BNB_8BIT}
    if quant is None or not bnb & set(quant.kinds()) or getattr(base, "hf_quantizer", None) is None:
        return base
    return base.dequantize(dtype=dtype).to(dtype)


def _as_trained(plan: MergePlan, model: Any) -> Any:
    """On a quantized base, run the reference as training ran it: train mode with every dropout at 0.

    A bitsandbytes base is dequantized before PEFT wraps it (_dequantized), so this matters only where quantized
    layers remain (FP8 kept as FP8 layers): their eval-mode kernels may differ from the training path.
    """
    if plan.base.quant is None or plan.base.quant.config_only:
        return model
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def token_vocab(model: Any) -> int:
    """Rows of the model's token embedding; 0 when its input is not tokens (images, audio)."""
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return 0
    return int(embedding.weight.shape[0]) if isinstance(embedding, torch.nn.Embedding) else 0


def short_error(exc: BaseException, limit: int = 160) -> str:
    """The exception's type and first line, cut short: transformers' messages can list 200 classes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for X:" says nothing alone
        text = f"{text} {lines[1]}"
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot read the base's config.json ({short_error(exc)}).") from exc


def _label_count(plan: MergePlan, choice: ModelChoice) -> int | None:
    """Rows of a classification head the adapter saved at another size than the base's (num_labels changed).

    Training did ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=N)``; the reference
    model must be built the same way for the adapter's head to fit. The labels are the rows of the head's
    output layer (RoBERTa's ``classifier.out_proj``, not its hidden-sized ``classifier.dense``).
    """
    if choice.task not in LABEL_TASKS:
        return None
    saved = {t.name: t for t in plan.tensors if t.adapter_key and t.name != _embed_name(plan)}
    head = output_layer(saved)
    if head is None:
        return None
    base = plan.base.tensors.get(head)
    return saved[head].shape[0] if base is None or base.info.shape[0] != saved[head].shape[0] else None


def _from_pretrained(
    choice: ModelChoice,
    path: Path,
    *,
    dtype: torch.dtype,
    which: str,
    notes: list[str],
    replaced: set[str] | None = None,
    config: dict[str, Any] | None = None,
) -> Any:
    """One from_pretrained; mismatched shapes (except tensors the adapter replaces) become one sentence."""
    name = choice.model_class.__name__
    torch.manual_seed(_INIT_SEED)
    try:
        with _quiet_transformers():
            # Mismatched shapes come back as data (and become our sentence) instead of a load report.
            model, info = choice.model_class.from_pretrained(
                path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **(config or {})
            )
    except Exception as exc:
        raise ModelLoadError(f"transformers could not load the {which} model as {name} ({short_error(exc)}).") from exc
    mismatched = sorted(
        (m for m in info.get("mismatched_keys") or [] if m[0] not in (replaced or ())), key=lambda m: m[0]
    )
    if mismatched:
        key, stored, expected = mismatched[0]
        raise ModelLoadError(
            f"The {which} checkpoint's {key} has shape {list(stored)} but {name} built from its config.json expects "
            f"{list(expected)}; config.json and the weights disagree (num_labels, vocab_size or hidden sizes)."
        )
    # A head the adapter brings is no weight "initialised alike": PEFT loads the trained one over it.
    missing = sorted(set(info.get("missing_keys") or []) - (replaced or set()))
    if missing:
        notes.append(
            f"not in the checkpoint, initialised alike in both: {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    return model


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loading reports are tables for developers; the verification table says what matters."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _tokenizer(merged_dir: Path) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(merged_dir)
    except Exception:  # noqa: BLE001 - a model without tokenizer still verifies on token ids
        return None


def _embed_name(plan: MergePlan) -> str | None:
    for t in plan.tensors:
        if t.name.endswith(
            ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "shared.weight")
        ):
            return t.name
    return None


__all__ = [
    "LoadedModels",
    "MemoryFit",
    "MergedModelLoadError",
    "ModelChoice",
    "free_memory",
    "memory_fit",
    "models_bytes",
    "placement",
    "architecture_task",
    "choose_model_class",
    "load_models",
    "peft_task_auto_class",
    "pick_device",
    "short_error",
    "token_vocab",
]
