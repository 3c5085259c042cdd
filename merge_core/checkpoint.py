"""The base model as the merge sees it: config plus safetensors headers, no tensor data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BaseCheckpointError, explain_os_error
from .json_files import JsonFormatError, read_json_file
from .safetensors_io import OpenFiles, SafetensorsFormatError, TensorInfo, read_header

if TYPE_CHECKING:
    from .quant import QuantizedBase

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


@dataclass(frozen=True)
class BaseTensor:
    shard: Path
    info: TensorInfo

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class BaseCheckpoint:
    """Everything about the base that the plan needs, read from a few KB of metadata."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, BaseTensor]  # in file order: shard by shard, by offset
    shards: list[Path] = field(default_factory=list)
    name: str | None = None  # Hub ID or the path the user gave; shown in messages
    quant: QuantizedBase | None = None  # set when the weights (or just the config) are quantized

    @property
    def nbytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors.values())

    @property
    def display_name(self) -> str:
        return self.name or str(self.path)

    def text_config(self) -> dict[str, Any]:
        """Multimodal configs nest the language model's settings under text_config."""
        nested = self.config.get("text_config")
        return nested if isinstance(nested, dict) else self.config

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def tie_word_embeddings(self) -> bool:
        for cfg in (self.config, self.text_config()):
            if "tie_word_embeddings" in cfg:
                return bool(cfg["tie_word_embeddings"])
        # transformers' PretrainedConfig default.
        return True

    def dominant_float_dtype(self) -> str:
        """The dtype that holds most floating-point bytes: what "keep the base dtype" means.

        For a quantized base it is the dtype its weights are computed in (the quantization
        config's compute dtype, else bfloat16): the codes themselves are no float dtype to keep.
        """
        if self.quant is not None and not self.quant.config_only:
            from .safetensors_io import ST_FROM_DTYPE

            return ST_FROM_DTYPE[self.quant.default_dtype]
        totals: dict[str, int] = {}
        for t in self.tensors.values():
            if t.info.is_float:
                totals[t.info.dtype] = totals.get(t.info.dtype, 0) + t.info.nbytes
        if not totals:
            raise BaseCheckpointError(f"{self.display_name} holds no floating-point weights to merge into.")
        return max(totals, key=totals.__getitem__)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = read_json_file(path)
    except FileNotFoundError:
        raise
    except JsonFormatError as exc:
        raise BaseCheckpointError(f"Could not read {what} ({path}): {exc}; download the model again.") from None
    except OSError as exc:
        raise BaseCheckpointError(explain_os_error(exc, f"read {what} at", path)) from exc
    if not isinstance(data, dict):
        raise BaseCheckpointError(f"{what} ({path}) is not a JSON object; download the model again.")
    return data


def shard_files(path: Path, weight_map: dict[str, str] | None) -> list[Path]:
    """The safetensors files that make up the model, as transformers picks them: the shards ``weight_map`` (the
    index's, _weight_map) lists, else model.safetensors."""
    if weight_map is not None:
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise BaseCheckpointError(
                f"The index lists {len(names)} shard(s) but {len(missing)} are missing in {path} "
                f"(e.g. {missing[0]}). Download the complete model."
            )
        return sorted((path / n for n in names), key=lambda p: p.name)
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    pickles = [n for n in PICKLE_WEIGHT_NAMES if (path / n).exists()]
    if pickles:
        raise BaseCheckpointError(
            f"The base model at {path} only has pickle weights ({pickles[0]}). This tool streams "
            "safetensors files and never executes pickles. Use a revision that has safetensors "
            "(many Hub repos have an 'Adding `safetensors` variant' pull request, e.g. revision "
            "refs/pr/1), or convert the model once with transformers' save_pretrained."
        )
    raise BaseCheckpointError(
        f"No model weights found in {path}: expected {SAFE_SINGLE} or {SAFE_INDEX} with its shards."
    )


def _weight_map(path: Path) -> dict[str, str] | None:
    """The index's weight_map where transformers reads the index: not when model.safetensors is beside it (as
    from_pretrained does), and only with plain file names in the model's folder.

    A name such as "../other/model.safetensors" or "/abs/path" would make the merge read (and, in the app,
    disclose) a file outside the folder the user chose; no model saved by transformers has one."""
    index_path = path / SAFE_INDEX
    if (path / SAFE_SINGLE).is_file() or not index_path.is_file():
        return None
    weight_map = read_json(index_path, "the safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BaseCheckpointError(
            f"{index_path} has no weight_map; the checkpoint is incomplete, so download it again."
        )
    for name in dict.fromkeys(weight_map.values()):
        parts = Path(name).parts if isinstance(name, str) else ()
        if not parts or Path(name).is_absolute() or ".." in parts or any(p in ("", ".") for p in parts):
            raise BaseCheckpointError(
                f"{index_path} lists the shard {json.dumps(name)[:80]}, which is not a file inside the model's "
                "folder; the index is broken or crafted, so download the model again."
            )
    return weight_map


def _check_index_agrees(path: Path, weight_map: dict[str, str] | None, tensors: dict[str, BaseTensor]) -> None:
    """transformers loads each tensor from the shard the index names: one the index misplaces would come out
    freshly initialised (random) from from_pretrained, so a merge of it could never equal PEFT's model."""
    for name, shard in (weight_map or {}).items():
        found = tensors.get(name)
        if found is None or found.shard != path / shard:
            where = f"it is in {found.shard.name}" if found is not None else "no shard holds it"
            raise BaseCheckpointError(
                f"{path / SAFE_INDEX} places {name} in {shard} but {where}; the index does not match its shards, "
                "so download the model again."
            )


def _check_model_type(path: Path, config: dict[str, Any]) -> None:
    """transformers picks the model class by model_type; without it neither the base nor the merged model loads."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise BaseCheckpointError(
            f"{path / 'config.json'} names no model_type, so transformers could load neither the base nor the "
            "merged model; use the model's complete config.json."
        )


def load_base_checkpoint(path: str | Path, name: str | None = None) -> BaseCheckpoint:
    path = Path(path)
    if not path.is_dir():
        raise BaseCheckpointError(f"The base model folder {path} does not exist; check the path (or give a Hub ID).")
    try:
        config = read_json(path / "config.json", "the base model's config")
    except FileNotFoundError:
        raise BaseCheckpointError(
            f"{path} has no config.json, so it is not a transformers model folder. Point the base at "
            "the folder (or Hub repo) that holds config.json and the safetensors weights."
        ) from None
    _check_model_type(path, config)
    weight_map = _weight_map(path)
    shards = shard_files(path, weight_map)
    tensors: dict[str, BaseTensor] = {}
    for shard in shards:
        try:
            header = read_header(shard)
        except SafetensorsFormatError as exc:
            raise BaseCheckpointError(f"Base shard {shard.name} is corrupt ({exc}); download it again.") from exc
        for info in header.tensors.values():
            if info.name in tensors:
                raise BaseCheckpointError(
                    f"Tensor {info.name} appears in two shards of {path}; the checkpoint is broken, so download "
                    "the model again."
                )
            tensors[info.name] = BaseTensor(shard, info)
    _check_index_agrees(path, weight_map, tensors)
    return BaseCheckpoint(
        path=path,
        config=config,
        tensors=tensors,
        shards=shards,
        name=name,
        quant=detect_base_quantization(config, tensors),
    )


def detect_base_quantization(config: dict[str, Any], tensors: dict[str, BaseTensor]) -> QuantizedBase | None:
    """The base's quantization from config and headers; 4-bit shapes are read from their tiny quant states."""
    from .quant import checkpoint_reader, detect_quantization, resolve_shapes

    quant = detect_quantization(config, tensors)
    if quant is None or quant.resolved:
        return quant
    files = OpenFiles()
    try:
        return resolve_shapes(quant, checkpoint_reader(tensors, files))
    finally:
        files.close()
