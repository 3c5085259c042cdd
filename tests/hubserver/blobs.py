"""File contents on disk, content-addressed by sha256, and the Hub's rules about single files."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

try:  # PyYAML ships with huggingface_hub; without it front matter is simply not parsed.
    import yaml
except ImportError:  # pragma: no cover
    yaml = None  # type: ignore[assignment]

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model")
# Lower than the Hub's 10 MB so tiny test models still exercise the LFS path.
LFS_MIN_SIZE = 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
# Same pattern as huggingface_hub.repocard.REGEX_YAML_BLOCK.
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit: where its bytes are and how git and the Hub name them."""

    sha256: str
    size: int
    git_oid: str  # git blob sha1 of the content (regular) or of the LFS pointer (lfs), as git stores it
    lfs: bool

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag and as preupload ``oid``: sha256 for LFS, git sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """The server's upload-mode decision, as the Hub makes it: by suffix, size or binary content."""
    return path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE or b"\0" in sample


def valid_path(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and not any(p in ("", ".", "..") for p in parts)


def front_matter(text: str) -> dict | None:
    """The README's YAML metadata; ValueError if it does not parse to a mapping."""
    match = _YAML_BLOCK.search(text)
    if match is None or yaml is None:
        return None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        raise ValueError(f"Invalid YAML in README.md metadata: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README.md metadata must be a YAML mapping")
    return data


class BlobStore:
    """Bytes under ``root/blobs/<2 hex>/<sha256>``; writes go through ``root/tmp`` and one rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def temp_path(self) -> Path:
        return self.root / "tmp" / secrets.token_hex(8)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def store(self, data: bytes, *, lfs: bool) -> FileEntry:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.temp_path()
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return self.entry(sha256, len(data), lfs=lfs, data=None if lfs else data)

    def adopt(self, tmp: Path, sha256: str) -> None:
        """Move an upload whose sha256 was checked into place."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)

    def entry(self, sha256: str, size: int, *, lfs: bool, data: bytes | None = None) -> FileEntry:
        if lfs:
            return FileEntry(sha256, size, git_sha1(lfs_pointer(sha256, size)), True)
        return FileEntry(sha256, size, git_sha1(self.read(sha256) if data is None else data), False)
