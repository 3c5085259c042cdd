"""The two transfers of a streamed push: base shards downloaded ahead of the merge (one at a time) and
output shards pre-uploaded behind it (in order, each hashed as soon as it is written)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MergeError, PushError
from .hub import HubClient, PushMode, PushResult, PushTarget, RepoRef, prepare_upload
from .progress import ProgressCallback, ProgressUpdate


@dataclass
class StreamBase:
    ref: RepoRef
    sha: str
    folder: Path
    sizes: dict[str, int]  # shard file name -> bytes
    owned_cache: bool  # the cache is this push's own folder: every consumed shard may go


class Fetcher:
    """Base shards on demand, one download at a time in a background thread (the prefetch)."""

    def __init__(self, client: HubClient, base: StreamBase, cache_dir: Path | None, progress: ProgressCallback) -> None:
        self.client, self.base, self.cache_dir, self.progress = client, base, cache_dir, progress
        self.total, self.done = sum(base.sizes.values()), 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.jobs: dict[Path, Future] = {}
        self.downloaded: list[str] = []
        self.cached: list[str] = []

    def name(self, path: Path) -> str:
        return path.relative_to(self.base.folder).as_posix()

    def want(self, paths: set[Path]) -> None:
        for path in sorted(paths):
            if path not in self.jobs:
                self.jobs[path] = self.pool.submit(self._fetch, path)

    def missing_bytes(self, paths: set[Path]) -> int:
        return sum(self.base.sizes.get(self.name(p), 0) for p in paths if p not in self.jobs and not p.exists())

    def wait(self, paths: set[Path]) -> None:
        self.want(paths)
        for path in sorted(paths):
            self.jobs[path].result()

    def _add(self, n: int, message: str = "") -> None:
        self.done += n
        self.progress(ProgressUpdate("download", min(self.done, self.total), self.total, "B", message))

    def _fetch(self, path: Path) -> None:
        name = self.name(path)
        if path.exists():
            self.cached.append(name)
            self._add(self.base.sizes.get(name, 0), f"{name} already in the cache, not downloaded again")
            return
        got = self.client.download_file(
            self.base.ref, self.base.sha, name, cache_dir=self.cache_dir, tqdm_class=_forwarding_tqdm(self._add)
        )
        if not path.exists():  # the cache layout would have to change under us
            raise MergeError(f"{name} was downloaded to {got}, not where the plan reads it ({path}); report this bug.")
        self.downloaded.append(name)

    def drop(self, path: Path) -> None:
        """Delete a consumed base shard: any in our own cache, else only what this run downloaded."""
        if not (self.base.owned_cache or self.name(path) in self.downloaded):
            return
        real = path.resolve()
        path.unlink(missing_ok=True)
        if real != path:
            real.unlink(missing_ok=True)  # the cache's blob behind the snapshot link

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _forwarding_tqdm(on_bytes):
    """A silent tqdm class that forwards huggingface_hub's byte counts."""
    from tqdm.auto import tqdm

    class Forwarding(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if n:
                on_bytes(int(n))
            return super().update(n)

    return Forwarding


class Uploader:
    """Output shards pre-uploaded in a background thread, in order; ``wait`` deletes each once sent.

    A shard is hashed (the LFS object id) as soon as it is written, in its own thread, while the
    previous shard is still on the wire: hashing in the upload thread left the link idle for a few
    seconds per shard (5 GB at ~1.7 GB/s).
    """

    def __init__(
        self, client: HubClient, target: PushTarget, total: int, progress: ProgressCallback, *, keep: bool = False
    ) -> None:
        self.client, self.target, self.total, self.progress = client, target, total, progress
        self.keep = keep  # a merged folder pushed as a whole stays where it is; streamed shards are deleted
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="upload")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="hash")
        self.queue: list[tuple[Path, Future]] = []  # queued or running, oldest first
        self.done = 0
        self.operations: list[Any] = []
        self.uploaded: list[str] = []
        self.already: list[str] = []
        self.held: set[Path] = set()  # the streamed function rows still read these: deleted on release

    def hold(self, path: Path) -> None:
        self.held.add(path)

    def release(self, path: Path) -> None:
        """Delete a held shard now if it is sent, else once ``wait`` sees it sent."""
        self.held.discard(path)
        if not self.keep and all(queued != path for queued, _ in self.queue):
            path.unlink(missing_ok=True)

    def _add(self, n: int, message: str = "") -> None:
        self.done += n
        self.progress(ProgressUpdate("upload", min(self.done, self.total), self.total, "B", message))

    def submit(self, path: Path) -> None:
        """Hash now, upload once the shards before it are sent; the file stays until ``wait`` deletes it."""
        prepared = self.hasher.submit(prepare_upload, path.name, path)
        self.queue.append((path, self.pool.submit(self._upload, path, prepared)))

    def wait(self, keep: int = 0) -> None:
        """Until at most ``keep`` shards are queued or uploading; the sent ones are deleted."""
        while len(self.queue) > keep:
            path, pending = self.queue.pop(0)
            try:
                pending.result()
            except Exception as exc:
                detail = str(exc) if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
                raise PushError(f"Upload failed ({detail}).{retry_hint(self.target)}") from exc
            if not self.keep and path not in self.held:
                path.unlink(missing_ok=True)

    def _upload(self, path: Path, prepared: Future) -> None:
        size = path.stat().st_size
        op, sent = self.client.preupload_file(
            self.target, path.name, path, on_bytes=self._add, prepared=prepared.result()
        )
        if sent == 0 and getattr(op, "_upload_mode", None) == "lfs" and _counts_bytes():
            self.already.append(path.name)
            self._add(size, f"{path.name} is already on the Hub (resumed push), not sent again")
        else:
            self.uploaded.append(path.name)
            self._add(size - sent, f"{path.name} uploaded")
        self.operations.append(op)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.hasher.shutdown(wait=True, cancel_futures=True)

    def small_operations(self, files: list[tuple[str, Path]]) -> list[Any]:
        """Commit operations for the ``(path in repo, file)`` pairs this uploader did not pre-upload."""
        from huggingface_hub import CommitOperationAdd

        sent = {op.path_in_repo for op in self.operations}
        return [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(p)) for n, p in files if n not in sent]

    def commit(self, small: list[Any], *, message: str, description: str) -> PushResult:
        """ONE commit (or pull request) of the pre-uploaded files and ``small``; nothing lands on failure."""
        operations = sorted(self.operations, key=lambda op: op.path_in_repo) + small
        try:
            pushed = self.client.commit_files(self.target, operations, message=message, description=description)
        except Exception as exc:
            detail = str(exc) if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
            raise PushError(f"The commit failed ({detail}).{retry_hint(self.target)}") from exc
        if self.target.mode is PushMode.PR and not pushed.pr_url:
            # huggingface_hub drops files the repo already has; with nothing left it opens no pull request.
            raise PushError(
                f"{self.target.repo_id} already holds exactly these files, so there is nothing to propose; "
                "no pull request was opened."
            )
        return pushed


def _counts_bytes() -> bool:
    """Whether uploads go through the LFS basic transfer, whose reads we count (Xet reads paths itself)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_DISABLE_XET)


def retry_hint(target: PushTarget) -> str:
    again = "run the same push again to resume: the shards the Hub already holds are not sent again."
    if target.mode is PushMode.NEW:
        return f" {target.repo_id} was created but nothing was committed; choose 'Update existing repo' and {again}"
    return f" Nothing was committed, {target.repo_id} is unchanged; {again}"
