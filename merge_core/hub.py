"""Hub IO: resolve IDs, read metadata before downloading, download what a merge needs, push.

Every call goes through one ``HfApi(endpoint=..., token=...)`` so the endpoint and the
token are explicit; the token is never logged, echoed or written anywhere by this module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from .errors import (
    HubError,
    HubNetworkError,
    InvalidOptionError,
    PushError,
    RepoAccessError,
    RepoNotFound,
    RevisionNotFound,
)
from .hub_files import (  # noqa: F401 - re-exported: the rest of merge_core imports them from hub
    ADAPTER_PATTERNS,
    BASE_SMALL_PATTERNS,
    adapter_files,
    base_weight_files,
    matching,
    pickle_only,
)
from .hub_ids import MAX_NAME_CHARS, RepoRef, is_repo_id, is_repo_name, parse_source  # noqa: F401 - re-exported
from .progress import ProgressCallback, ProgressUpdate, no_progress

T = TypeVar("T")


class PushMode(StrEnum):
    """The three ways a merged model reaches the Hub."""

    NEW = "new"  # create the repository; refused if it exists
    UPDATE = "update"  # one commit on an existing repository's main branch
    PR = "pr"  # a pull request on an existing repository

    @classmethod
    def parse(cls, value: PushMode | str) -> PushMode:
        if value not in cls._value2member_map_:
            raise InvalidOptionError(f"Unknown push mode {value!r}; choose one of {', '.join(m.value for m in cls)}.")
        return cls(value)


@dataclass(frozen=True)
class PushTarget:
    """A push target that passed the preflight (see HubClient.preflight_push)."""

    repo_id: str
    mode: PushMode
    private: bool = False


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit_oid: str
    commit_url: str
    pr_url: str | None


class HubClient:
    def __init__(self, token: str | None = None, endpoint: str | None = None, *, oauth_scope: str | None = None):
        from huggingface_hub import HfApi

        # token=False keeps huggingface_hub from sending a cached login or HF_TOKEN the
        # caller did not hand us (on a Space that would be the Space owner's secret).
        self._token: Any = token if token else False
        # A Space login's scopes ("openid profile contribute-repos ..."): whoami-v2 does not show them.
        self.oauth_scope = oauth_scope
        self.api = HfApi(endpoint=endpoint, token=self._token)
        self.endpoint = self.api.endpoint

    def __repr__(self) -> str:  # never show the token
        return f"HubClient(endpoint={self.endpoint!r}, token={'***' if self._token else None})"

    # --- errors ---------------------------------------------------------------------------------

    def _call(self, what: RepoRef | str, fn: Callable[[], T]) -> T:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        ref = what if isinstance(what, RepoRef) else RepoRef(what)
        try:
            return fn()
        except GatedRepoError as exc:
            raise RepoAccessError(
                f"{ref.repo_id} is a gated model. Open {self.endpoint}/{ref.repo_id}, accept its conditions with your "
                "account, then log in (or pass a token of that account with read access)."
            ) from exc
        except RepositoryNotFoundError as exc:
            hint = (
                " If it is private, log in with an account that can see it."
                if not self._token
                else " If it is private, make sure your token's account has access to it."
            )
            raise RepoNotFound(
                f"Repository {ref.repo_id} was not found on {self.endpoint}. Check the spelling.{hint}"
            ) from exc
        except RevisionNotFoundError as exc:
            raise RevisionNotFound(
                f"Revision {ref.revision!r} does not exist in {ref.repo_id}. Use a branch, tag or commit of that repo "
                "(or leave it empty for main)."
            ) from exc
        except EntryNotFoundError as exc:
            raise HubError(f"A file is missing in {ref}: {exc}") from exc
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise RepoAccessError(
                    f"Access to {ref.repo_id} was refused ({status}). Log in, or use a token with access to it."
                ) from exc
            if status is not None and status >= 500:
                raise HubNetworkError(
                    f"The Hub answered {status} for {ref.repo_id}; this is usually temporary, try again in a minute."
                ) from exc
            raise HubError(f"The Hub refused the request for {ref.repo_id}: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise HubNetworkError(self._unreachable(exc)) from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("httpx", "httpcore", "httpx2", "httpcore2")):
                raise HubNetworkError(self._unreachable(exc)) from exc
            raise

    def _unreachable(self, exc: BaseException) -> str:
        return (
            f"Could not reach {self.endpoint} ({type(exc).__name__}). Check the connection and try again; "
            "nothing was written."
        )

    # --- reading --------------------------------------------------------------------------------

    def resolve(self, ref: RepoRef) -> tuple[str, dict[str, int]]:
        """The commit sha of the revision and {path: size} of every file in the repo."""
        info = self._call(ref, lambda: self.api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True))
        sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        if not sizes or any(s.size is None for s in (info.siblings or [])):
            tree = self._call(
                ref, lambda: list(self.api.list_repo_tree(ref.repo_id, revision=info.sha, recursive=True))
            )
            sizes = {f.path: int(getattr(f, "size", 0) or 0) for f in tree if getattr(f, "size", None) is not None}
        return str(info.sha), sizes

    def card_data(self, ref: RepoRef) -> dict[str, Any]:
        try:
            info = self._call(ref, lambda: self.api.model_info(ref.repo_id, revision=ref.revision))
        except HubError:
            return {}
        data = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
        if getattr(info, "pipeline_tag", None):
            data.setdefault("pipeline_tag", info.pipeline_tag)
        return data

    def download(
        self,
        ref: RepoRef,
        sha: str,
        files: Iterable[str],
        cache_dir: Path | None = None,
        progress: ProgressCallback = no_progress,
        total_bytes: int = 0,
    ) -> Path:
        from huggingface_hub import snapshot_download

        tqdm_class = _progress_tqdm(progress, f"download {ref.repo_id}", total_bytes) if total_bytes else None
        kwargs = self._download_kwargs(ref, sha, cache_dir, tqdm_class, allow_patterns=sorted(set(files)))
        return Path(self._call(ref, lambda: snapshot_download(**kwargs)))

    def _download_kwargs(
        self, ref: RepoRef, sha: str, cache_dir: Path | None, tqdm_class: Any, **extra: Any
    ) -> dict[str, Any]:
        """The arguments every download shares: the pinned commit, this client's token and endpoint."""
        kwargs: dict[str, Any] = dict(
            repo_id=ref.repo_id,
            revision=sha,
            token=self._token,
            endpoint=self.endpoint,
            cache_dir=str(cache_dir) if cache_dir else None,
            **extra,
        )
        if tqdm_class is not None:
            kwargs["tqdm_class"] = tqdm_class
        return kwargs

    def safetensors_headers(self, ref: RepoRef, sha: str) -> dict[str, dict[str, Any]]:
        """{shard: {tensor: (dtype, shape)}} from HTTP range reads of the headers, no weights."""
        meta = self._call(ref, lambda: self.api.get_safetensors_metadata(ref.repo_id, revision=sha))
        out: dict[str, dict[str, Any]] = {}
        for shard, file_meta in meta.files_metadata.items():
            out[shard] = {
                name: (t.dtype, tuple(t.shape), tuple(t.data_offsets)) for name, t in file_meta.tensors.items()
            }
        return out

    # --- writing --------------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        if not self._token:
            raise PushError("Log in with your Hugging Face account (or paste a write token) to push the merged model.")
        try:
            return self._call("whoami", lambda: self.api.whoami())
        except RepoAccessError as exc:
            raise PushError(
                "The Hub did not accept this token. Log in again or create a new token with write access."
            ) from exc

    def check_push_permission(self, repo_id: str, mode: PushMode | str) -> str:
        """The token may push to ``repo_id`` in ``mode``: it can write the namespace (new, update) and
        holds the mode's permission (merge_core.permissions). Whether the repo exists is not asked, so
        a re-merge after a push passes too. Returns the repo id with the account's name added if needed."""
        from .permissions import require_permission

        mode = PushMode.parse(mode)
        me = self.whoami()
        repo_id = (repo_id or "").strip()
        if "/" not in repo_id:
            repo_id = f"{me.get('name')}/{repo_id}"
        if not is_repo_name(repo_id):
            raise PushError(
                f"{repo_id[:200]!r} is not a repository name the Hub accepts; use owner/name "
                f"(letters, digits, '-', '_', '.'; at most {MAX_NAME_CHARS} characters each)."
            )
        require_permission(
            me, mode, repo_id, oauth_scope=self.oauth_scope, endpoint=self.endpoint, ask_hub=self._hub_refuses_writes
        )
        return repo_id

    def _hub_refuses_writes(self, repo_id: str) -> bool:
        """Ask the Hub whether this token may write ``repo_id``: a preupload of no files writes nothing
        and is refused (403) exactly when a commit would be. Any other answer is left to the push."""
        from huggingface_hub.utils import build_hf_headers, get_session

        url = f"{self.endpoint}/api/models/{repo_id}/preupload/main"
        headers = build_hf_headers(token=self._token)
        answer = self._call(RepoRef(repo_id), lambda: get_session().post(url, json={"files": []}, headers=headers))
        return answer.status_code in (401, 403)

    def preflight_push(self, repo_id: str, mode: PushMode | str, *, private: bool = False) -> PushTarget:
        """Everything a push can be refused for, checked before any merge or upload: the token holds
        the mode's permission, the namespace is the account's own or one of its organisations, and
        the target is free (new) or exists (update, pull request)."""
        mode = PushMode.parse(mode)
        repo_id = self.check_push_permission(repo_id, mode)
        exists = self._call(RepoRef(repo_id), lambda: self.api.repo_exists(repo_id))
        if mode is PushMode.NEW and exists:
            raise PushError(
                f"{repo_id} already exists. Choose another name, or 'Update existing repo' / 'Open a pull request'."
            )
        if mode is not PushMode.NEW and not exists:
            raise PushError(f"{repo_id} does not exist (or your account cannot see it); choose 'Create new repo'.")
        return PushTarget(repo_id, mode, private)

    # --- streamed push: one file at a time, then one commit --------------------------------------

    def download_file(self, ref: RepoRef, sha: str, filename: str, *, cache_dir: Path | None, tqdm_class=None) -> Path:
        """One file of ``ref`` at commit ``sha`` into the cache (kept there when already present)."""
        from huggingface_hub import hf_hub_download

        kwargs = self._download_kwargs(ref, sha, cache_dir, tqdm_class, filename=filename)
        return Path(self._call(ref, lambda: hf_hub_download(**kwargs)))

    def create_target(self, target: PushTarget) -> None:
        """Create the repository of a NEW target (nothing else is written)."""
        if target.mode is not PushMode.NEW:
            return
        try:
            self._call(
                RepoRef(target.repo_id),
                lambda: self.api.create_repo(target.repo_id, private=target.private, exist_ok=False),
            )
        except HubError as exc:
            raise PushError(
                f"Could not create {target.repo_id}: {exc}. Your token needs write access to the "
                f"namespace {target.repo_id.split('/')[0]!r}."
            ) from exc

    def preupload_file(
        self,
        target: PushTarget,
        path_in_repo: str,
        path: Path,
        *,
        on_bytes: Callable[[int], None] | None = None,
        prepared: Any | None = None,
    ) -> tuple[Any, int]:
        """Upload one LFS file without committing it: (the operation for create_commit, bytes sent).

        0 bytes sent for an LFS file means the Hub already held that content (the LFS batch answered
        without an upload action), which is what lets an interrupted push resume. ``prepared`` is
        prepare_upload's operation for this file, hashed ahead while the link carried something else.
        """
        sent = [0]

        def count(n: int) -> None:
            sent[0] += n
            if on_bytes is not None:
                on_bytes(n)

        op = prepared if prepared is not None else prepare_upload(path_in_repo, path)
        op.on_read = count
        self._write(
            target,
            lambda: self.api.preupload_lfs_files(
                target.repo_id, additions=[op], create_pr=target.mode is PushMode.PR, free_memory=False
            ),
        )
        return op, sent[0]

    def _write(self, target: PushTarget, fn: Callable[[], T]) -> T:
        """A write to ``target``; a refusal that the token info could not predict (an OAuth token pasted
        without its scopes) names the mode's permission."""
        try:
            return self._call(RepoRef(target.repo_id), fn)
        except RepoAccessError as exc:
            from .permissions import hub_refused

            raise RepoAccessError(hub_refused(target.mode, target.repo_id, endpoint=self.endpoint)) from exc

    def commit_files(self, target: PushTarget, operations: list[Any], *, message: str, description: str) -> PushResult:
        """ONE commit (or pull request) of ``operations``; an update also deletes weights the new commit lacks."""
        from huggingface_hub import CommitOperationDelete

        ref = RepoRef(target.repo_id)
        ops = list(operations)
        if target.mode is PushMode.UPDATE:
            # An update replaces the weights whole: stale shards of an older merge must not survive.
            kept = {op.path_in_repo for op in ops}
            present = self._call(ref, lambda: self.api.list_repo_files(target.repo_id))
            stale = [f for f in present if _is_weight_file(f) and f not in kept]
            ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        info = self._write(
            target,
            lambda: self.api.create_commit(
                target.repo_id,
                operations=ops,
                commit_message=message,
                commit_description=description,
                create_pr=target.mode is PushMode.PR,
            ),
        )
        pr_url = getattr(info, "pr_url", None)
        url = f"{self.endpoint}/{target.repo_id}"
        return PushResult(target.repo_id, url, str(info.oid), str(info.commit_url), pr_url)


def _is_weight_file(path: str) -> bool:
    return "/" not in path and (path.endswith(".safetensors") or path == "model.safetensors.index.json")


def prepare_upload(path_in_repo: str, path: Path) -> Any:
    """The commit operation for one file, its sha256 computed now (huggingface_hub reads the whole file)."""
    return _counting_add(path_in_repo=path_in_repo, path_or_fileobj=str(path))


@functools.cache
def _counting_add_class() -> type:
    """CommitOperationAdd whose file reads are counted: byte-level upload progress (basic LFS transfer)."""
    from contextlib import contextmanager

    from huggingface_hub import CommitOperationAdd

    class CountingAdd(CommitOperationAdd):
        on_read: Callable[[int], None] | None = None

        @contextmanager
        def as_file(self, with_tqdm: bool = False):  # type: ignore[override]
            with super().as_file(with_tqdm=False) as fileobj:
                on_read, read = self.on_read, fileobj.read
                if on_read is not None:

                    def counted(size: int | None = -1) -> bytes:
                        data = read(size)
                        on_read(len(data))
                        return data

                    fileobj.read = counted  # the way huggingface_hub's own tqdm_stream_file counts
                yield fileobj

    return CountingAdd


def _counting_add(**kwargs: Any) -> Any:
    return _counting_add_class()(**kwargs)


def _progress_tqdm(progress: ProgressCallback, stage: str, total: int):
    """A tqdm class that forwards snapshot_download's byte counts to our callback."""
    from tqdm.auto import tqdm

    state = {"done": 0}

    class ForwardingTqdm(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # A disabled tqdm skips most of its setup (no .unit), so remember what we need first.
            self._counts_bytes = kwargs.get("unit") == "B"
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._counts_bytes and n:
                state["done"] += int(n)
                progress(ProgressUpdate(stage, min(state["done"], total), total, "B"))
            return super().update(n)

    return ForwardingTqdm
