"""Hub IDs and local folders, as people type them: ``owner/name[/subfolder][@revision]`` or a path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidOptionError, explain_os_error

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(text: str | None) -> bool:
    """Whether ``text`` has the shape of a Hub repo ID, ``owner/name``."""
    return bool(text) and bool(_REPO_ID.match(str(text)))


# The Hub's own limit on a user, organisation or repository name.
MAX_NAME_CHARS = 96


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: str | None = None
    subfolder: str = ""  # PEFT's multi-adapter layout keeps each adapter in a subfolder

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return self.repo_id + sub + (f"@{self.revision}" if self.revision else "")


def parse_source(text: str, revision: str | None = None) -> RepoRef | Path:
    """A local folder if one exists at that path, else a Hub ID ``owner/name[@revision]``."""
    text = (text or "").strip()
    if not text:
        raise ValueError("Enter a Hub model ID like owner/name, or a local folder.")
    path = Path(text).expanduser()
    if _is_local(path, text):
        return path
    if "@" in text:
        text, _, rev = text.partition("@")
        revision = revision or rev or None
    parts = text.strip("/").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    too_long = any(len(part) > MAX_NAME_CHARS for part in parts[:2])
    if too_long or not _REPO_ID.match(repo_id) or ".." in text or repo_id.endswith((".", "-")):
        shown = text if len(text) <= 120 else text[:60] + "…" + text[-40:]
        raise ValueError(f"{shown!r} is neither a local folder nor a Hub model ID of the form owner/name.")
    return RepoRef(repo_id, (revision or "").strip() or None, subfolder)


def _is_local(path: Path, text: str) -> bool:
    """True for an existing folder or a text written as a path; an unusable path is refused in
    one sentence (the operating system's reason), never as a traceback."""
    written_as_path = text.startswith((".", "/", "~"))
    try:
        exists = path.exists()
        is_dir = path.is_dir()
    except OSError as exc:
        if not written_as_path:
            return False  # e.g. a 10,000-character "ID": the Hub ID rules refuse it next
        raise InvalidOptionError(explain_os_error(exc, "read the folder", text)) from None
    if not (exists or written_as_path):
        return False
    if not is_dir:
        raise ValueError(f"{text} is not a folder.")
    return True


def is_repo_name(repo_id: str) -> bool:
    """A repo ID the Hub accepts to create: the ID's shape, each part at most MAX_NAME_CHARS long."""
    owner, _, name = repo_id.partition("/")
    return is_repo_id(repo_id) and len(owner) <= MAX_NAME_CHARS and len(name) <= MAX_NAME_CHARS
