"""Folders a live process is writing, told apart from those a killed run left behind.

Each working folder gets a sibling ``<name>.lock`` file that its process holds an exclusive
``flock`` on for as long as it works there. The kernel drops the lock when the process dies,
however it dies (SIGKILL included), so "lock file missing or lockable" means "abandoned".
The file also names the owner's pid for a person looking at the folder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

LOCK_SUFFIX = ".lock"


def lock_path(folder: Path) -> Path:
    return folder.with_name(folder.name + LOCK_SUFFIX)


@dataclass
class Claim:
    """An exclusive claim on a working folder, held until ``release``."""

    folder: Path
    fd: int
    made_parents: tuple[Path, ...] = ()  # folders created to hold ``folder``, innermost first (outputs.discard)

    def release(self, *, remove_folder: bool = False) -> None:
        if remove_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.fd >= 0:
            lock_path(self.folder).unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


def claim(folder: Path) -> Claim:
    """Create ``folder`` (which must not exist) and hold its lock file."""
    fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        folder.mkdir()
    except BaseException:
        os.close(fd)
        raise
    return Claim(folder, fd)


def is_abandoned(folder: Path) -> bool:
    """True when no live process holds the folder's lock (or it never had one)."""
    try:
        fd = os.open(lock_path(folder), os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # unreadable: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return False
    finally:
        os.close(fd)  # closing also drops the probe lock we may have taken
    return True


def remove_abandoned(parent: Path, pattern: str) -> list[Path]:
    """Remove folders matching ``pattern`` under ``parent`` whose owner is gone; returns them."""
    removed: list[Path] = []
    try:
        candidates = sorted(parent.glob(pattern))
    except OSError:
        return removed
    for folder in candidates:
        if folder.name.endswith(LOCK_SUFFIX) or not is_abandoned(folder):
            continue
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)
        lock_path(folder).unlink(missing_ok=True)
        removed.append(folder)
    return removed
