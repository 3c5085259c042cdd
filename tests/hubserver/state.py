"""The Hub's memory: users, tokens, repos, branches, commits, LFS objects, access rules, injected failures.

No sockets and no HTTP here. A commit becomes visible in one swap of a branch pointer, after every
check, so a failed request leaves the state as it was. File bytes live in a ``BlobStore``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .blobs import GITATTRIBUTES, BlobStore, FileEntry, valid_path, wants_lfs

REPO_TYPES = ("model", "dataset", "space")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")

RepoKey = tuple[str, str]  # (repo type, "namespace/name")


class HubError(Exception):
    """An error the Hub answers with: status, message, and the ``X-Error-Code`` the client dispatches on."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more fields for the JSON body


@dataclass(frozen=True)
class TokenInfo:
    """One token: a classic one (``write`` is its role), an OAuth one (``scopes``, issued to ``app``) or
    a fine-grained one (``global_permissions``, and ``scoped`` per user, organisation or repo name)."""

    user: str
    write: bool
    kind: str = "classic"  # "classic", "oauth" or "fineGrained" (see auth.py)
    scopes: frozenset[str] = frozenset()
    app: str | None = None
    global_permissions: frozenset[str] = frozenset()
    scoped: tuple[tuple[str, frozenset[str]], ...] = ()


@dataclass
class Commit:
    sha: str
    parent: str | None
    branch: str
    message: str
    description: str
    files: dict[str, FileEntry]
    changed: list[str]
    deleted: list[str]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    gated: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # branch name ("main", "refs/pr/1") -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)  # insertion order = history order
    grants: set[str] = field(default_factory=set)  # user names with read access
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of LFS objects uploaded to this repo
    created_by_app: str | None = None  # the OAuth app whose token created it (contribute-repos writes these)
    next_pr: int = 1

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]


@dataclass(frozen=True)
class PendingUpload:
    """An LFS object the batch endpoint handed out an upload URL for."""

    key: RepoKey
    oid: str
    size: int


def now() -> str:
    stamp = datetime.now(UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def check_path(path: str) -> str:
    if not valid_path(path):
        raise HubError(400, f"Invalid file path {path!r}")
    return path


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


class HubState:
    """Everything the Hub knows; ``base_url`` is where it is served (links in answers point there).

    Setup and read-back methods take ``lock`` themselves; rules and changes expect the caller to hold
    it (``operations`` does), so that a check and the change it allows happen under one lock.
    """

    def __init__(self, root: Path, base_url: str = "http://hub.invalid") -> None:
        self.base_url = base_url
        self.lock = threading.RLock()
        self.blobs = BlobStore(root)
        self.users: dict[str, set[str]] = {}  # user name -> orgs
        self.tokens: dict[str, TokenInfo] = {}
        self.repos: dict[RepoKey, Repo] = {}
        self.pending_uploads: dict[str, PendingUpload] = {}  # URL signature -> what it may receive
        self.upload_limit: int | None = None
        self.uploaded_bytes = 0
        self.commits_fail = False
        self.sparse_uploads = False  # set by HubServer: checked uploads kept as sparse files (benchmarks)

    # --- setup (what a test arranges before the client talks) -----------------------------------

    def add_user(self, name: str, token: str, *, write: bool = True, orgs: list[str] | tuple[str, ...] = ()) -> None:
        """Register ``token`` for user ``name``; a user may hold several tokens (e.g. one read-only)."""
        with self.lock:
            self.users.setdefault(name, set()).update(orgs)
            self.tokens[token] = TokenInfo(name, write)

    def add_oauth_token(self, name: str, token: str, scopes: str, *, app: str = "lora-merge-space") -> None:
        """An OAuth token of ``app`` acting as user ``name`` with the space-separated ``scopes``."""
        with self.lock:
            self.users.setdefault(name, set())
            self.tokens[token] = TokenInfo(name, False, "oauth", frozenset(scopes.split()), app)

    def add_fine_grained_token(
        self,
        name: str,
        token: str,
        *,
        global_permissions: tuple[str, ...] = (),
        scoped: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        """A fine-grained token of user ``name``: ``scoped`` maps a user, org or repo name to its permissions."""
        entries = tuple((entity, frozenset(perms)) for entity, perms in (scoped or {}).items())
        with self.lock:
            self.users.setdefault(name, set())
            self.tokens[token] = TokenInfo(
                name, False, "fineGrained", global_permissions=frozenset(global_permissions), scoped=entries
            )

    def create_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        gated: bool = False,
        owner_token: str | None = None,
        repo_type: str = "model",
    ) -> None:
        """Create a repo with its initial commit (``.gitattributes``), like the Hub does."""
        if owner_token is not None:
            info = self.tokens.get(owner_token)
            if info is None or not self.owns(info.user, repo_id.split("/", 1)[0]):
                raise PermissionError(f"owner_token does not own the namespace of {repo_id}")
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            self.new_repo(repo_type, repo_id, private=private, gated=gated)

    def add_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        message: str = "seed",
        revision: str = "main",
        *,
        repo_type: str = "model",
    ) -> str:
        """Commit ``{path_in_repo: bytes or local file}`` as one commit; returns its sha.

        A ``revision`` that is not a branch yet is created from main's head.
        """
        entries: dict[str, FileEntry | None] = {}
        for path, value in files.items():
            data = Path(value).read_bytes() if isinstance(value, (str, os.PathLike)) else bytes(value)
            entries[check_path(path)] = self.blobs.store(data, lfs=wants_lfs(path, len(data), data[:512]))
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            if revision not in repo.refs:
                repo.refs[revision] = repo.refs["main"]
            repo.lfs_objects.update(e.sha256 for e in entries.values() if e is not None and e.lfs)
            return self.apply_commit(repo, revision, entries, message=message).sha

    def upload_dir(self, repo_id: str, folder: Path, message: str = "seed", *, repo_type: str = "model") -> str:
        """Commit every file under ``folder`` (recursively, ``.git`` skipped) as one commit."""
        folder = Path(folder)
        files: dict[str, bytes | Path] = {
            p.relative_to(folder).as_posix(): p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(folder).parts
        }
        return self.add_files(repo_id, files, message, repo_type=repo_type)

    def grant(self, repo_id: str, token: str, *, repo_type: str = "model") -> None:
        """Give the token's user read access to a private or gated repo (access is per user, as on the Hub)."""
        with self.lock:
            info = self.tokens.get(token)
            if info is None:
                raise KeyError("unknown token: add_user() it first")
            self.repo(repo_type, repo_id).grants.add(info.user)

    # --- injected failures ----------------------------------------------------------------------

    def fail_uploads_after(self, n_bytes: int | None) -> None:
        """LFS PUTs answer 403 once the bytes received since this call exceed ``n_bytes``; None disables.

        403, not 500: the client retries 5xx with exponential backoff, which would only slow tests down.
        """
        with self.lock:
            self.upload_limit, self.uploaded_bytes = n_bytes, 0

    def fail_commits(self, flag: bool) -> None:
        """While set, ``/commit`` answers 400 and changes nothing."""
        with self.lock:
            self.commits_fail = flag

    def count_upload(self, n_bytes: int) -> bool:
        """Count received upload bytes; True once the injected upload limit is passed."""
        with self.lock:
            self.uploaded_bytes += n_bytes
            return self.upload_limit is not None and self.uploaded_bytes > self.upload_limit

    # --- reading back (what a test asserts on) --------------------------------------------------

    def repo_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            files = dict(repo.commits[self.resolve(repo, revision)].files)
        return {path: self.blobs.read(e.sha256) for path, e in sorted(files.items())}

    def commits(self, repo_id: str, *, repo_type: str = "model") -> list[dict]:
        """Every commit of the repo, oldest first, on main, other branches and PR refs."""
        with self.lock:
            repo = self.repo(repo_type, repo_id)
            return [
                {
                    "sha": c.sha,
                    "parent": c.parent,
                    "branch": c.branch,
                    "message": c.message,
                    "description": c.description,
                    "files_changed": list(c.changed),
                    "files_deleted": list(c.deleted),
                    "date": c.date,
                }
                for c in repo.commits.values()
            ]

    # --- rules (call with the lock held) ---------------------------------------------------------

    def caller(self, token: str | None) -> TokenInfo | None:
        """Who a bearer token belongs to; unknown tokens read as anonymous, as on the Hub."""
        with self.lock:
            return self.tokens.get(token) if token else None

    def owns(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or namespace in self.users.get(user, set()))

    def visible_repo(self, caller: TokenInfo | None, key: RepoKey) -> Repo:
        """The repo if the caller may see it; private repos are hidden as 404, like the Hub does."""
        from .auth import may_read_private

        user = caller.user if caller else None
        repo = self.repos.get(key)
        if repo is None or (repo.private and not self.owns(user, repo.namespace) and user not in repo.grants):
            raise repo_not_found(key[1])
        if repo.private and caller is not None and not may_read_private(caller, repo):
            raise repo_not_found(key[1])
        return repo

    def check_gate(self, caller: TokenInfo | None, repo: Repo) -> None:
        user = caller.user if caller else None
        if repo.gated and not (self.owns(user, repo.namespace) or user in repo.grants):
            raise HubError(
                403,
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
                "GatedRepo",
            )

    def resolve(self, repo: Repo, revision: str) -> str:
        """A branch, PR ref or full commit sha -> commit sha."""
        if revision in repo.refs:
            return repo.refs[revision]
        if _SHA1.match(revision) and revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # --- changes (call with the lock held) ------------------------------------------------------

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id}") from None

    def new_repo(self, repo_type: str, repo_id: str, *, private: bool, gated: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private, gated, now())
        self.repos[(repo_type, repo_id)] = repo
        repo.refs["main"] = ""
        initial = {".gitattributes": self.blobs.store(GITATTRIBUTES, lfs=False)}
        self.apply_commit(repo, "main", initial, message="initial commit")
        return repo

    def apply_commit(
        self,
        repo: Repo,
        branch: str,
        ops: Mapping[str, FileEntry | None],
        *,
        message: str,
        description: str = "",
        new_branch: str | None = None,
    ) -> Commit:
        """Build the new manifest from ``branch``'s head; ``None`` deletes a path. All checks first, then one swap."""
        parent = repo.refs[branch] or None
        files = dict(repo.commits[parent].files) if parent else {}
        changed, deleted = [], []
        for path, entry in ops.items():
            if entry is None:
                files.pop(path)
                deleted.append(path)
            elif files.get(path) != entry:
                files[path] = entry
                changed.append(path)
        seed = json.dumps([parent, message, sorted((p, e.etag) for p, e in files.items()), time.time_ns()])
        # Random salt: two servers sharing one HF cache must never mint the same sha for different trees.
        sha = hashlib.sha1(seed.encode() + secrets.token_bytes(8)).hexdigest()
        target = new_branch or branch
        commit = Commit(sha, parent, target, message, description, files, changed, deleted, now())
        repo.commits[sha] = commit
        repo.refs[target] = sha
        return commit
