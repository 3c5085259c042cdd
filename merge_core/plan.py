"""The merge plan: every decision about the merge, made from metadata before any data moves.

Building a plan reads adapter_config.json, the adapter's tensors (small), the base's
config.json and safetensors headers. It never reads base tensor data and never writes;
every mismatch between adapter and base surfaces here as a specific exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from .adapter import AdapterConfig, AdapterWeights, LoraModule, load_adapter_config, load_adapter_weights
from .checkpoint import BaseCheckpoint, BaseTensor, load_base_checkpoint
from .errors import (
    AdapterBaseMismatchError,
    AdapterConfigError,
    AdapterWeightsError,
    ShapeMismatchError,
    TargetModuleNotFoundError,
    UnsupportedAdapterError,
)
from .safetensors_io import ST_FROM_DTYPE, PlannedTensor

OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_DTYPE_NAMES = {**{v: k for k, v in OUTPUT_DTYPES.items()}, "F64": "float64"}


def dtype_name(st_dtype: str) -> str:
    """'BF16' -> 'bfloat16': the name transformers and users know."""
    return _DTYPE_NAMES.get(st_dtype, st_dtype)
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000

# Models whose linear layers are transformers' Conv1D, stored (in_features, out_features).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt"})
# Where checkpoints saved from a bare base model lack the task head's prefix, or the reverse.
_PREFIXES = ("model.", "transformer.", "gpt_neox.", "language_model.", "model.language_model.")
_INPUT_EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
    "model.decoder.embed_tokens.weight",
    "embed_tokens.weight",
    "wte.weight",
)
_OUTPUT_EMBEDDING_NAME = "lm_head.weight"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Small files a merged model needs besides weights; weights, indexes and cards are ours to write.
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "README.md", ".gitattributes"}
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")


@dataclass(frozen=True)
class LowRankDelta:
    """delta_stored = scale * L @ R, in the orientation the base tensor is stored in.

    ``l_key``/``r_key`` name adapter tensors; ``l_transpose``/``r_transpose`` say whether
    they must be transposed first (fan_in_fan_out and embedding LoRA store B @ A transposed).
    """

    module: str
    l_key: str
    r_key: str
    l_transpose: bool
    r_transpose: bool
    scale: float
    rank: int
    alpha: float


@dataclass(frozen=True)
class DoraSpec:
    magnitude_key: str
    # "row": the magnitude scales each stored row (Linear); "col": each stored column
    # (Conv1D and Embedding), which needs the column norms of the whole tensor first.
    axis: Literal["row", "col"]


@dataclass
class ModulePlan:
    """One base module the adapter changes (for the report and the verification)."""

    module: str
    tensor: str
    kind: Literal["linear", "embedding", "replaced"]
    variant: str
    shape: tuple[int, ...]
    rank: int = 0
    alpha: float = 0.0
    scale: float = 0.0
    fan_in_fan_out: bool = False


@dataclass
class OutputTensorPlan:
    name: str
    dtype: str  # safetensors dtype of the output
    shape: tuple[int, ...]
    base: Optional[BaseTensor] = None  # where the starting value comes from...
    adapter_key: Optional[str] = None  # ...or the adapter (modules_to_save, resized embeddings)
    deltas: list[LowRankDelta] = field(default_factory=list)
    bias_deltas: list[tuple[str, float]] = field(default_factory=list)  # (adapter key of lora_B.bias, scale)
    dora: Optional[DoraSpec] = None

    @property
    def is_copy(self) -> bool:
        return (
            self.base is not None
            and not self.deltas
            and not self.bias_deltas
            and self.dora is None
            and self.base.info.dtype == self.dtype
        )

    @property
    def changed(self) -> bool:
        return bool(self.deltas or self.bias_deltas or self.dora or self.adapter_key)

    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.dtype, self.shape)


@dataclass
class MergeOptions:
    dtype: str = "auto"  # "auto" keeps the base's dtype
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES
    compute_dtype: str = "float64"
    device: str = "cpu"
    base_name: Optional[str] = None  # Hub ID or path as the user typed it
    adapter_name: Optional[str] = None
    adapter_revision: Optional[str] = None


@dataclass
class MergePlan:
    base: BaseCheckpoint
    adapter_config: AdapterConfig
    adapter: AdapterWeights
    options: MergeOptions
    output_dtype: str
    tensors: list[OutputTensorPlan]
    shards: list[list[OutputTensorPlan]]
    modules: list[ModulePlan]
    config: dict[str, Any]
    copy_files: dict[str, Path]  # output file name -> source file
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def output_nbytes(self) -> int:
        return sum(math.prod(t.shape) * torch.empty((), dtype=_torch_dtype(t.dtype)).element_size() for t in self.tensors)

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.options.compute_dtype]

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _torch_dtype(st: str) -> torch.dtype:
    from .safetensors_io import DTYPE_FROM_ST

    return DTYPE_FROM_ST[st]


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1234 -> 1234 (the Hub's conventions)."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, factor = text, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"Cannot read the size {value!r}; write it like 5GB, 500MB or 2GiB.") from None
    if size <= 0:
        raise ValueError(f"The shard size must be positive, got {value!r}.")
    return size


def _same_model_name(a: Optional[str], b: Optional[str]) -> Optional[bool]:
    """None when either side is unknown; local paths compare by their last two components."""
    if not a or not b:
        return None
    norm = lambda s: "/".join(Path(s.rstrip("/")).parts[-2:]).lower()  # noqa: E731
    return norm(a) == norm(b) or Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


class _Planner:
    def __init__(self, base: BaseCheckpoint, config: AdapterConfig, adapter: AdapterWeights, options: MergeOptions):
        self.base = base
        self.config = config
        self.adapter = adapter
        self.options = options
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.names_differ = _same_model_name(config.base_model_name_or_path, options.base_name or base.name) is False
        self._bias_targets: dict[str, list[tuple[str, float]]] = {}

    # --- messages -------------------------------------------------------------------------

    def _who(self) -> str:
        declared = self.config.base_model_name_or_path or "an unnamed base"
        chosen = self.options.base_name or self.base.display_name
        return f"The adapter was trained on {declared!r}; you chose {chosen!r} as the base."

    def _mismatch(self, message: str) -> ShapeMismatchError:
        if self.names_differ:
            return AdapterBaseMismatchError(
                f"{message} {self._who()} Use the base model the adapter was made for."
            )
        return ShapeMismatchError(f"{message} Check that the adapter belongs to this base model.")

    def _not_found(self, module: str, tensor: str) -> TargetModuleNotFoundError:
        similar = sorted(n for n in self.base.tensors if n.rsplit(".", 2)[0].endswith(module.rsplit(".", 1)[-1]))[:3]
        hint = f" Similar base tensors: {', '.join(similar)}." if similar else ""
        message = f"The adapter changes {module!r}, but the base model has no tensor {tensor!r}.{hint}"
        if self.config.task_type and self.config.task_type not in ("CAUSAL_LM", None):
            message += f" The adapter is for task {self.config.task_type}, which needs another model head."
        if self.names_differ:
            message += f" {self._who()} Use the base model the adapter was made for."
        else:
            message += " Check that the adapter belongs to this base model."
        return TargetModuleNotFoundError(message)

    # --- base tensor lookup -----------------------------------------------------------------

    def resolve(self, name: str, extra: dict[str, BaseTensor]) -> Optional[str]:
        known = self.base.tensors.keys() | extra.keys()
        if name in known:
            return name
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            candidate = ".".join(parts[i:])
            if candidate in known:
                return candidate
        for prefix in _PREFIXES:
            if prefix + name in known:
                return prefix + name
        return None

    def input_embedding(self) -> Optional[str]:
        for name in _INPUT_EMBEDDING_NAMES:
            if name in self.base.tensors:
                return name
        vocab = self.base.text_config().get("vocab_size")
        for name, t in self.base.tensors.items():
            if ("embed" in name or "wte" in name) and len(t.info.shape) == 2 and t.info.shape[0] == vocab:
                return name
        return None

    def weights_transposed(self, lora: dict[str, tuple[LoraModule, str]]) -> bool:
        """Whether square Linear-like weights are stored (in, out), as transformers' Conv1D does."""
        if self.config.fan_in_fan_out or self.base.model_type in CONV1D_MODEL_TYPES:
            return True
        for module, tensor in lora.values():
            if module.is_embedding:
                continue
            b = self.adapter.specs[module.b].shape  # type: ignore[index]
            a = self.adapter.specs[module.a].shape  # type: ignore[index]
            shape = self._shape(tensor)
            if b[0] != a[1] and shape == (a[1], b[0]):
                return True
        return False

    def _shape(self, tensor: str) -> tuple[int, ...]:
        return self._starts[tensor].shape

    # --- the plan ---------------------------------------------------------------------------

    def build(self) -> MergePlan:
        base, adapter, cfg = self.base, self.adapter, self.config
        out_dtype = self._output_dtype()

        embed = self.input_embedding()
        tied_head_absent = base.tie_word_embeddings and _OUTPUT_EMBEDDING_NAME not in base.tensors and embed is not None
        virtual: dict[str, BaseTensor] = {}
        if tied_head_absent:
            # The head shares the embedding matrix; it only becomes a tensor of its own if the
            # adapter changes one side and not the other (decided below).
            virtual[_OUTPUT_EMBEDDING_NAME] = base.tensors[embed]  # type: ignore[index]

        # Starting values: base tensors, replaced by full tensors the adapter ships.
        self._starts: dict[str, PlannedTensor] = {
            n: PlannedTensor(n, t.info.dtype, t.info.shape) for n, t in {**base.tensors, **virtual}.items()
        }
        replaced: dict[str, str] = {}
        for module_tensor, key in adapter.replacements.items():
            target = self.resolve(module_tensor, virtual)
            if target is None:
                raise self._not_found(module_tensor.rsplit(".", 1)[0], module_tensor)
            spec = adapter.specs[key]
            start = self._starts[target]
            if len(spec.shape) != len(start.shape) or (spec.shape[1:] != start.shape[1:]):
                raise self._mismatch(
                    f"The adapter's saved copy of {target} has shape {list(spec.shape)}, the base's is {list(start.shape)}."
                )
            if spec.shape != start.shape:
                self.notes.append(
                    f"{target}: the adapter resized it from {start.shape[0]} to {spec.shape[0]} rows (resized vocabulary)."
                )
            replaced[target] = key
            self._starts[target] = PlannedTensor(target, ST_FROM_DTYPE.get(spec.dtype, start.dtype), spec.shape)

        lora: dict[str, tuple[LoraModule, str]] = {}
        for module_name, module in adapter.lora_modules.items():
            target = self.resolve(f"{module_name}.weight", virtual)
            if target is None:
                raise self._not_found(module_name, f"{module_name}.weight")
            lora[module_name] = (module, target)
        transposed_model = self.weights_transposed(lora)

        untie = False
        if tied_head_absent:
            touched = set(replaced) | {t for _, t in lora.values()}
            head_touched = _OUTPUT_EMBEDDING_NAME in touched
            embed_touched = embed in touched
            if head_touched or embed_touched:
                if cfg.ensure_weight_tying and not head_touched:
                    self.notes.append("The adapter keeps input and output embeddings tied (ensure_weight_tying).")
                else:
                    untie = True
                    self.notes.append(
                        "The base ties lm_head to the input embedding, but the adapter changes "
                        f"{'both differently' if head_touched and embed_touched else ('only lm_head' if head_touched else 'only the input embedding')}; "
                        "the merged model stores lm_head separately (tie_word_embeddings=false) so it computes exactly what base+adapter computes."
                    )

        plans: dict[str, OutputTensorPlan] = {}
        order = list(base.tensors) + ([_OUTPUT_EMBEDDING_NAME] if untie else [])
        for name in order:
            start = self._starts[name]
            src = base.tensors.get(name) or virtual[name]
            st_dtype = out_dtype if start.dtype in ("F64", "F32", "F16", "BF16") else start.dtype
            plans[name] = OutputTensorPlan(
                name=name,
                dtype=st_dtype,
                shape=start.shape,
                base=None if name in replaced else src,
                adapter_key=replaced.get(name),
            )

        modules: list[ModulePlan] = []
        for target, key in replaced.items():
            if target not in plans:
                continue
            modules.append(ModulePlan(target.rsplit(".", 1)[0], target, "replaced", "modules_to_save", plans[target].shape))

        for module_name, (module, target) in lora.items():
            if target not in plans:  # tied head left tied: the delta lands on the shared embedding
                target = embed  # type: ignore[assignment]
            modules.append(self._plan_lora(module, target, plans[target], transposed_model))
        for bias_name, bias_deltas in self._bias_targets.items():
            plans[bias_name].bias_deltas.extend(bias_deltas)

        if untie or any(p.adapter_key for p in plans.values()):
            self._check_vocab(plans, embed)

        tensors = [plans[n] for n in order]
        shards = self._shard(tensors)
        config = self._output_config(plans, embed, out_dtype, untie)
        return MergePlan(
            base=base,
            adapter_config=cfg,
            adapter=adapter,
            options=self.options,
            output_dtype=out_dtype,
            tensors=tensors,
            shards=shards,
            modules=modules,
            config=config,
            copy_files=self._files_to_copy(),
            notes=self.notes,
            warnings=self.warnings,
        )

    def _output_dtype(self) -> str:
        requested = self.options.dtype
        if requested in (None, "", "auto"):
            return self.base.dominant_float_dtype()
        if requested not in OUTPUT_DTYPES:
            raise ValueError(f"Unknown output dtype {requested!r}; choose auto, {', '.join(OUTPUT_DTYPES)}.")
        return OUTPUT_DTYPES[requested]

    def _plan_lora(self, module: LoraModule, target: str, plan: OutputTensorPlan, transposed_model: bool) -> ModulePlan:
        cfg, specs = self.config, self.adapter.specs
        a_shape = specs[module.a].shape  # type: ignore[index]
        b_shape = specs[module.b].shape  # type: ignore[index]
        w_shape = plan.shape
        name = module.module
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise UnsupportedAdapterError(
                f"{name}: LoRA on layers with {len(a_shape)}-D weights (convolutions) is not supported; "
                "this tool merges LoRA on Linear, Conv1D and Embedding layers."
            )
        if len(w_shape) != 2:
            raise self._mismatch(f"{name}: the base tensor {target} has shape {list(w_shape)}, not a 2-D weight matrix.")
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise AdapterWeightsError(
                f"{name}: lora_A has rank {rank} but lora_B has rank {b_shape[1]}; the adapter file is inconsistent."
            )
        configured = cfg.rank_for(name)
        if configured != rank:
            raise AdapterConfigError(
                f"{name}: adapter_config.json says rank {configured} (r / rank_pattern) but the weights have rank {rank}. "
                "The config does not belong to these weights; save the adapter again with PEFT."
            )
        alpha = cfg.alpha_for(name)
        scale = cfg.scale_for(name)

        if module.is_embedding:
            # PEFT: delta = (B @ A).T with A (r, num_embeddings), B (dim, r).
            expected = (a_shape[1], b_shape[0])
            if w_shape != expected:
                raise self._mismatch(
                    f"{name}: embedding LoRA of shape {list(expected)} does not fit the base embedding {target} {list(w_shape)}."
                )
            delta = LowRankDelta(name, module.a, module.b, True, True, scale, rank, alpha)  # type: ignore[arg-type]
            kind, dora_axis, fifo = "embedding", "col", False
            mag_len = w_shape[1]
        else:
            out_f, in_f = b_shape[0], a_shape[1]
            if (out_f, in_f) == (in_f, out_f) and w_shape == (out_f, in_f):
                fifo = transposed_model
            elif w_shape == (out_f, in_f):
                fifo = False
            elif w_shape == (in_f, out_f):
                fifo = True
            else:
                raise self._mismatch(
                    f"{name}: LoRA maps {in_f} -> {out_f} features but the base tensor {target} has shape {list(w_shape)}."
                )
            if fifo:  # stored (in, out): delta = (B @ A).T = A.T @ B.T
                delta = LowRankDelta(name, module.a, module.b, True, True, scale, rank, alpha)  # type: ignore[arg-type]
            else:
                delta = LowRankDelta(name, module.b, module.a, False, False, scale, rank, alpha)  # type: ignore[arg-type]
            kind, dora_axis = "linear", ("col" if fifo else "row")
            mag_len = out_f
        plan.deltas.append(delta)

        variant = "rslora" if cfg.use_rslora else "lora"
        if module.magnitude is not None:
            mag_shape = specs[module.magnitude].shape
            if math.prod(mag_shape) != mag_len:
                raise AdapterWeightsError(
                    f"{name}: the DoRA magnitude vector has {math.prod(mag_shape)} entries, expected {mag_len}."
                )
            if len(plan.deltas) > 1:
                raise UnsupportedAdapterError(f"{name}: DoRA cannot be combined with another delta on the same tensor.")
            plan.dora = DoraSpec(module.magnitude, dora_axis)  # type: ignore[arg-type]
            variant = "dora" if not cfg.use_rslora else "dora+rslora"
        elif cfg.use_dora:
            raise AdapterWeightsError(
                f"{name}: adapter_config.json enables DoRA but the weights have no lora_magnitude_vector for this module."
            )
        if module.b_bias is not None:
            bias_name = target.rsplit(".", 1)[0] + ".bias"
            if bias_name not in self.base.tensors:
                raise self._mismatch(f"{name}: the adapter trains a bias (lora_bias) but the base layer has no bias {bias_name}.")
            self._bias_targets.setdefault(bias_name, []).append((module.b_bias, scale))
            variant += "+bias"
        if kind == "embedding":
            variant = "embedding-" + variant
        return ModulePlan(name, target, kind, variant, w_shape, rank, alpha, scale, fifo)  # type: ignore[arg-type]

    def _check_vocab(self, plans: dict[str, OutputTensorPlan], embed: Optional[str]) -> None:
        head = plans.get(_OUTPUT_EMBEDDING_NAME)
        if embed is None or head is None or embed not in plans:
            return
        if plans[embed].shape[0] != head.shape[0]:
            raise AdapterWeightsError(
                f"The adapter resized the vocabulary but ships only one side of it: {embed} has "
                f"{plans[embed].shape[0]} rows and {_OUTPUT_EMBEDDING_NAME} has {head.shape[0]}. The rows of the new "
                "tokens on the other side are not in the adapter; save it with both embed_tokens and lm_head in "
                "modules_to_save."
            )

    def _shard(self, tensors: list[OutputTensorPlan]) -> list[list[OutputTensorPlan]]:
        limit = self.options.max_shard_size
        shards: list[list[OutputTensorPlan]] = [[]]
        size = 0
        for t in tensors:
            nbytes = t.planned().nbytes
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += nbytes
        return shards

    def _output_config(self, plans: dict[str, OutputTensorPlan], embed: Optional[str], out_dtype: str, untie: bool) -> dict[str, Any]:
        import copy

        config = copy.deepcopy(self.base.config)
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype_name(out_dtype)
        targets = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
        if embed is not None and embed in plans:
            vocab = plans[embed].shape[0]
            for cfg in targets:
                if "vocab_size" in cfg and cfg["vocab_size"] != vocab:
                    self.notes.append(f"vocab_size {cfg['vocab_size']} -> {vocab} to match the adapter's embeddings.")
                    cfg["vocab_size"] = vocab
        if untie:
            for cfg in targets:
                cfg["tie_word_embeddings"] = False
        return config

    def _files_to_copy(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        adapter_has_tokenizer = any((self.adapter.path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        for path in sorted(self.base.path.iterdir()):
            if not path.is_file() or path.name in _SKIP_FILES or not path.name.endswith(_COPY_SUFFIXES):
                continue
            if path.name.startswith(("adapter_", "pytorch_model")) or path.name.endswith(".index.json"):
                continue
            if adapter_has_tokenizer and path.name in TOKENIZER_FILES:
                continue
            files[path.name] = path
        if adapter_has_tokenizer:
            self.notes.append("Tokenizer files come from the adapter (it ships its own tokenizer).")
            for name in TOKENIZER_FILES:
                if (self.adapter.path / name).is_file():
                    files[name] = self.adapter.path / name
        return files


def build_plan(
    base: str | Path | BaseCheckpoint,
    adapter: str | Path,
    options: Optional[MergeOptions] = None,
    *,
    check_finite: bool = True,
) -> MergePlan:
    """Validate base and adapter against each other and decide everything about the merge."""
    options = options or MergeOptions()
    adapter_path = Path(adapter)
    cfg = load_adapter_config(adapter_path)
    weights = load_adapter_weights(adapter_path)
    if isinstance(base, BaseCheckpoint):
        checkpoint = base
    else:
        checkpoint = load_base_checkpoint(base, name=options.base_name)
    if options.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown compute dtype {options.compute_dtype!r}; choose float64 or float32.")
    planner = _Planner(checkpoint, cfg, weights, options)
    plan = planner.build()
    if planner.names_differ:
        plan.warnings.append(
            f"The adapter names {cfg.base_model_name_or_path!r} as its base, not {options.base_name or checkpoint.display_name!r}. "
            "All shapes match, so the merge went ahead; make sure this is the model you meant."
        )
    if check_finite:
        weights.check_finite()
    return plan
