"""Per-request working folders that a crash cannot orphan.

Each folder is claimed with merge_core.locks (a sibling lock file held with ``flock`` while its
process lives), so a sweep can remove exactly the folders whose process died (SIGKILL, OOM, a
restarted Space) and never one a live request is still writing.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from .locks import Claim, claim, remove_abandoned

# Distinct from other "lms-" temp names (test homes, caches) so a sweep only ever matches ours.
WORKDIR_PREFIX = "lms-job-"
COMBINED_ADAPTER_PREFIX = ".combined-adapter-"


def _parent(parent: Path | None) -> Path:
    return Path(parent) if parent is not None else Path(tempfile.gettempdir())


def sweep_workdirs(parent: Path | None = None) -> list[Path]:
    """Remove per-request folders (default: in the temp folder) whose process is gone."""
    return remove_abandoned(_parent(parent), f"{WORKDIR_PREFIX}*")


def new_workdir(parent: Path | None = None) -> Claim:
    """A fresh claimed folder for one request, after sweeping those of dead processes."""
    root = _parent(parent)
    sweep_workdirs(root)
    return claim(root / f"{WORKDIR_PREFIX}{uuid.uuid4().hex[:12]}")


def sweep_combined(parent: Path) -> list[Path]:
    """Remove combined-adapter folders under ``parent`` whose process is gone."""
    return remove_abandoned(Path(parent), f"{COMBINED_ADAPTER_PREFIX}*")


def new_combined_folder(parent: Path) -> Claim:
    """A claimed folder for a combined adapter beside the output (removed when the merge ends)."""
    sweep_combined(parent)
    return claim(Path(parent) / f"{COMBINED_ADAPTER_PREFIX}{uuid.uuid4().hex[:8]}")


__all__ = ["WORKDIR_PREFIX", "new_combined_folder", "new_workdir", "sweep_combined", "sweep_workdirs"]
