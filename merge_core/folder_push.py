"""Push a merged folder in ONE commit with byte progress: each weight file is pre-uploaded through the
streamed push's uploader (its bytes counted as they are read), then one commit adds them with the small
files (config, tokenizer, index, card). ``upload_folder`` would do the same but report nothing until the end."""

from __future__ import annotations

from pathlib import Path

from .hub import HubClient, PushResult, PushTarget
from .progress import ProgressCallback, ProgressUpdate, no_progress, serialized
from .stream_transfer import Uploader

# Files the Hub stores in LFS whatever their size; everything else rides in the commit itself.
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(path in the repo, file) for every file under ``folder``, sorted."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())


def push_folder_with_progress(
    client: HubClient,
    target: PushTarget,
    folder: Path,
    *,
    message: str,
    description: str,
    progress: ProgressCallback = no_progress,
) -> PushResult:
    """Create the repo (mode new), pre-upload the weights with byte progress, then ONE commit (or pull request).

    Progress is one "upload" stage in bytes of the whole folder; it reaches the total only once the
    commit has landed, so a slow commit shows as the last step rather than as a finished bar.
    """
    files = folder_files(folder)
    total = sum(p.stat().st_size for _, p in files)
    progress = serialized(progress)
    progress(ProgressUpdate("upload", 0, total, "B", target.repo_id))
    client.create_target(target)
    # The last bytes are reported by the commit: the uploader's bar must not claim them first.
    weights = [(name, p) for name, p in files if "/" not in name and name.endswith(LFS_SUFFIXES)]
    uploader = Uploader(client, target, total, progress, keep=True)
    try:
        for _, path in weights:
            uploader.submit(path)
        uploader.wait()
    finally:
        uploader.close()
    small = uploader.small_operations(files)
    count = len(uploader.operations) + len(small)
    progress(ProgressUpdate("upload", uploader.done, total, "B", f"committing {count} files"))
    pushed = uploader.commit(small, message=message, description=description)
    progress(ProgressUpdate("upload", total, total, "B", f"committed {pushed.commit_oid[:10]}"))
    return pushed


__all__ = ["LFS_SUFFIXES", "folder_files", "push_folder_with_progress"]
