"""GGUF files beside a merged model: the types asked for, the refusal before any merge, the export and its rows.

The exporter itself lives in ``merge_core.gguf_export``; this module only wires it into a merge job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import GgufUnsupportedError
from .progress import ProgressCallback, no_progress
from .verify_report import Check

GGUF_HELP = (
    "also write GGUF files for llama.cpp, Ollama and LM Studio, e.g. F16,Q8_0 (types: F32, F16, BF16, Q8_0; "
    "architectures: {archs}); with --verify each file is read back and compared with the merged model"
)


def parse_gguf_types(text: str | Iterable[str] | None) -> list[str]:
    """'f16, Q8_0,F16' -> ['F16', 'Q8_0']: upper-cased, de-duplicated, each one a known type."""
    from .gguf_export import GGUF_TYPES

    items = text.split(",") if isinstance(text, str) else list(text or [])
    types = list(dict.fromkeys(str(t).strip().upper() for t in items if str(t).strip()))
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise GgufUnsupportedError(
            f"GGUF type {', '.join(unknown)} is not supported; choose from {', '.join(GGUF_TYPES)} (comma-separated)."
        )
    return types


def preflight_folder(folder: Path, types: list[str]) -> None:
    """Refuse, from the base's config.json alone, a GGUF export that must fail (before any download or merge)."""
    if not types:
        return
    from transformers import AutoConfig

    from .gguf_export import preflight_gguf

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - an architecture transformers does not know cannot be exported either
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise GgufUnsupportedError(
            f"GGUF export cannot read the base model's config ({first}); merge without --gguf."
        ) from None
    preflight_gguf(config, types)


def gguf_name(folder_name: str, qtype: str) -> str:
    """The file name llama.cpp's ``-hf OWNER/REPO:TYPE`` looks for: ``<repo-name>-<TYPE>.gguf``."""
    return f"{folder_name}-{qtype}.gguf"


@dataclass
class GgufOutputs:
    files: dict[str, Path] = field(default_factory=dict)  # type -> path in the output folder
    checks: list[Check] = field(default_factory=list)


def write_gguf_files(
    output_dir: Path,
    types: list[str],
    *,
    verify: bool,
    fits: tuple[bool, str] = (True, ""),
    progress: ProgressCallback = no_progress,
) -> GgufOutputs:
    """Export each type into the output folder; with ``verify`` add the metadata, token and logits rows.

    ``fits``: whether two float32 copies of the model fit in memory (functional_budget); if not, the
    logits row is skipped with that reason and the cheap rows still run.
    """
    from .gguf_export import export_gguf

    result = GgufOutputs()
    for qtype in types:
        path = output_dir / gguf_name(output_dir.name, qtype)
        export_gguf(output_dir, path, qtype=qtype, progress=progress)
        result.files[qtype] = path
        if verify:
            # one table row per file and check: "gguf metadata (Q8_0)", not two rows of the same name
            rows = _rows(output_dir, path, qtype, fits)
            result.checks += [
                c if c.name.endswith(f"({qtype})") else replace(c, name=f"{c.name} ({qtype})") for c in rows
            ]
    return result


def _rows(output_dir: Path, path: Path, qtype: str, fits: tuple[bool, str]) -> list[Check]:
    from .gguf_export import verify_gguf

    return verify_gguf(output_dir, path, qtype=qtype, logits_skipped="" if fits[0] else fits[1])


def rename_for_repo(files: dict[str, Path], repo_name: str) -> dict[str, Path]:
    """Rename the GGUF files to ``<repo-name>-<TYPE>.gguf`` (what ``llama-cli -hf`` finds) before a push."""
    renamed: dict[str, Path] = {}
    for qtype, path in files.items():
        wanted = path.with_name(gguf_name(repo_name, qtype))
        if path != wanted and path.exists():
            path.rename(wanted)
        renamed[qtype] = wanted
    return renamed


def gguf_usage(repo_id: str, types: Iterable[str]) -> list[str]:
    """Model-card lines: how llama.cpp, Ollama and LM Studio run each GGUF file of the repo."""
    lines: list[str] = []
    for qtype in types:
        lines += [f"llama-cli -hf {repo_id}:{qtype}", f"ollama run hf.co/{repo_id}:{qtype}"]
    return lines


def unsupported_note(model_type: Any) -> str:
    from .gguf_export import supported_architectures

    return (
        f"No GGUF file was made: the architecture {model_type!r} cannot be exported to GGUF yet "
        f"(supported: {', '.join(supported_architectures())})."
    )
