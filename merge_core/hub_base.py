"""A Hub base before its shards: small files and safetensors headers, and the checkpoint they describe.

Both the folder merge (inputs) and the streamed push (stream_push) validate the whole plan from these
before any shard is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import BaseCheckpoint, BaseTensor, read_json
from .hub import BASE_SMALL_PATTERNS, HubClient, RepoRef, base_weight_files, matching
from .safetensors_io import TensorInfo


def headers_checkpoint(base_dir: Path, headers: dict[str, dict[str, Any]], name: str) -> BaseCheckpoint | None:
    """A BaseCheckpoint from remote headers, so the plan validates before the shards download.

    None when a 4-bit weight's shape can only be read from its quant state (inside the shards): the
    plan is then validated once they are downloaded.
    """
    from .quant import config_shapes, detect_quantization, with_shape_hints

    config = read_json(base_dir / "config.json", "the base model's config")
    tensors: dict[str, BaseTensor] = {}
    for shard, entries in sorted(headers.items()):
        for tensor, (dtype, shape, offsets) in entries.items():
            info = TensorInfo(tensor, dtype, tuple(shape), offsets[0], offsets[1])
            tensors[tensor] = BaseTensor(base_dir / shard, info)
    quant = detect_quantization(config, tensors)
    if quant is not None and not quant.resolved:
        quant = with_shape_hints(quant, config_shapes(config))
        if any(t.shape is None for t in quant.tensors.values()):
            return None
    return BaseCheckpoint(
        path=base_dir,
        config=config,
        tensors=tensors,
        shards=[base_dir / s for s in sorted(headers)],
        name=name,
        quant=quant,
    )


@dataclass(frozen=True)
class HubBaseFiles:
    """A Hub base before any shard: its commit, file sizes, small files on disk and the headers' checkpoint."""

    sha: str
    files: dict[str, int]
    folder: Path
    headers: dict[str, dict[str, Any]]
    checkpoint: BaseCheckpoint | None  # None where a quantized base's shapes are known only from its shards

    @property
    def small(self) -> list[str]:
        return matching(self.files, BASE_SMALL_PATTERNS)


def hub_base_files(ref: RepoRef, client: HubClient, *, cache_dir: Path | None) -> HubBaseFiles:
    """Small files and safetensors headers of ``ref`` (pickle-only repos refused first): all but the shards."""
    sha, files = client.resolve(ref)
    base_weight_files(files, ref)  # refuses pickle-only repos before any download
    folder = Path(client.download(ref, sha, matching(files, BASE_SMALL_PATTERNS), cache_dir=cache_dir))
    headers = client.safetensors_headers(ref, sha)
    return HubBaseFiles(sha, files, folder, headers, headers_checkpoint(folder, headers, str(ref)))


__all__ = ["HubBaseFiles", "headers_checkpoint", "hub_base_files"]
