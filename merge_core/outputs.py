"""Where a merged model goes: refusing outputs that would touch an input, staging beside the
target, replacing it atomically, and clearing what killed runs left behind.

Every write goes to ``.<name>.partial-<id>`` next to the output (same filesystem, so the final
rename is atomic), claimed with a lock file (merge_core.locks) so that the next run can tell
a live merge from a dead one and remove only the dead one's leftovers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputExistsError, OutputWriteError, UnsafeOutputError, explain_os_error
from .locks import Claim, claim, remove_abandoned


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _relation(output: Path, protected: Path) -> str | None:
    if output == protected:
        return "is"
    if output in protected.parents:
        return "contains"
    if protected in output.parents:
        return "lies inside"
    return None


def check_output_target(output: str | Path, *, protected: Iterable[tuple[str, Path]], overwrite: bool) -> Path:
    """The absolute output path, after refusing any location that would touch an input.

    ``protected`` pairs a description ("the base model") with a path; symlinks are resolved on
    both sides, so a link pointing into an input is caught too.
    """
    if "\x00" in str(output):  # os functions raise a bare ValueError("embedded null byte") on it
        raise OutputWriteError(
            f"The output path {str(output)!r} holds a NUL character, which no filesystem allows; choose another name."
        )
    output = Path(os.path.abspath(Path(output).expanduser()))
    try:
        return _checked(output, protected=protected, overwrite=overwrite)
    except OSError as exc:  # a name too long, a file where a folder should be, ...
        raise OutputWriteError(explain_os_error(exc, "use the output location", output)) from exc


def _checked(output: Path, *, protected: Iterable[tuple[str, Path]], overwrite: bool) -> Path:
    real = _real(output)
    for what, path in protected:
        if "\x00" in str(path):
            continue  # no such file can exist; its loader refuses it by name ("does not exist")
        relation = _relation(real, _real(Path(path)))
        if relation is not None:
            raise UnsafeOutputError(
                f"The output {output} {relation} {what} ({path}); writing there could destroy it. "
                "Choose an output folder outside every input."
            )
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise OutputExistsError(
            f"{output} already exists. Choose another output folder or pass overwrite=True (CLI: --overwrite)."
        )
    return output


def sweep_leftovers(output: Path) -> list[Path]:
    """Remove staging and trash folders of this output that no live process owns."""
    parent = output.parent
    if not parent.is_dir():
        return []
    return [
        *remove_abandoned(parent, f".{output.name}.partial-*"),
        *remove_abandoned(parent, f".{output.name}.old-*"),
    ]


def begin_staging(output: Path) -> Claim:
    """A fresh, claimed staging folder beside ``output``."""
    try:
        existing = next(p for p in output.parents if p.exists())
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        made = missing_folders(output.parent)
        output.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(output)
        staging = claim(output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}")
        staging.made_parents = made
        return staging
    except OSError as exc:
        raise OutputWriteError(explain_os_error(exc, "create the output folder in", output.parent)) from exc


def publish(staging: Claim, output: Path) -> None:
    """Move the finished staging folder to ``output``, replacing what was there."""
    if not (output.exists() or output.is_symlink()):
        os.rename(staging.folder, output)
        return
    if output.is_symlink() or not output.is_dir():
        # A file or a link (even one to a folder) is replaced itself; its target is left alone.
        output.unlink()
        os.rename(staging.folder, output)
        return
    trash = claim(output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        trash.folder.rmdir()  # claim() made it; the rename below needs the name free
        os.rename(output, trash.folder)
        os.rename(staging.folder, output)
    finally:
        trash.release(remove_folder=True)


def discard(staging: Claim) -> None:
    """Remove an unfinished staging folder and its lock, and the output's parents made for it (while empty)."""
    staging.release(remove_folder=True)
    remove_if_empty(staging.made_parents)


def missing_folders(folder: Path) -> tuple[Path, ...]:
    """``folder`` and its parents that do not exist yet, innermost first: what a run will have made."""
    return tuple(p for p in (folder, *folder.parents) if not p.exists())


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Remove the folders a failed run made (innermost first), each only while empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


__all__ = [
    "begin_staging",
    "check_output_target",
    "discard",
    "missing_folders",
    "publish",
    "remove_if_empty",
    "sweep_leftovers",
]
