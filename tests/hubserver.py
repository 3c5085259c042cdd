"""A local, Hugging Face Hub-compatible HTTP server for tests (standard library only).

It speaks the subset of the Hub HTTP API that the real ``huggingface_hub`` client (2.x, with
``HF_HUB_DISABLE_XET=1``), transformers and peft use: whoami, repo create/delete, model info,
tree listing, file resolve (HEAD/GET/Range), validate-yaml, preupload, the LFS batch/PUT/verify
protocol and ndjson commits, including pull requests (``refs/pr/N``), private and gated repos.

File contents live on disk under ``root/blobs`` (content-addressed by sha256); repo state
(branches, commits, manifests) is kept in memory behind one lock. A commit becomes visible
only when ``/commit`` succeeds, so uploaded-but-uncommitted LFS objects never show in a repo.

    server = HubServer(tmp_path).start()
    server.add_user("alice", "hf_alice", write=True)
    HfApi(endpoint=server.url, token="hf_alice").create_repo("alice/model")

Set ``HUBSERVER_VERBOSE=1`` to print one line per request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pathlib
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional
from urllib.parse import parse_qs, unquote

try:  # PyYAML ships with huggingface_hub; without it front matter is simply not parsed.
    import yaml
except ImportError:  # pragma: no cover
    yaml = None  # type: ignore[assignment]

__all__ = ["HubServer", "RequestRecord"]

_VERBOSE = os.environ.get("HUBSERVER_VERBOSE") == "1"
_log = logging.getLogger(__name__)
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model")
_LFS_MIN_SIZE = 1024 * 1024
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
# Same pattern as huggingface_hub.repocard.REGEX_YAML_BLOCK.
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in _LFS_SUFFIXES).encode()
_CHUNK = 1024 * 1024


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    git_oid: str  # git blob sha1 of the content (regular) or of the LFS pointer (lfs), as git stores it
    lfs: bool

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag and as preupload ``oid``: sha256 for LFS, git sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    sha: str
    parent: Optional[str]
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
    next_pr: int = 1

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]


@dataclass(frozen=True)
class TokenInfo:
    user: str
    write: bool


@dataclass
class RequestRecord:
    method: str
    path: str  # with query string
    headers: dict[str, str]  # Authorization redacted to "Bearer ***"
    token_name: Optional[str]  # the user the token maps to, None when anonymous or unknown
    had_auth: bool
    status: int = 0


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Optional[pathlib.Path] = None  # streamed instead of body
    file_range: tuple[int, int] = (0, 0)  # [start, end) within file


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None,
                 extra: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more fields for the JSON body


@dataclass
class _Request:
    method: str
    segments: list[str]  # raw (still percent-encoded) path segments
    query: dict[str, list[str]]
    headers: Any
    caller: Optional[TokenInfo]
    body: bytes = b""

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise _HubError(400, f"Invalid JSON body: {exc}") from exc

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or [""])[0].lower() in ("1", "true")


# --- helpers ---------------------------------------------------------------------------------


def _now() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
    # Lower than the Hub's 10 MB so tiny test models still exercise the LFS path.
    return path.endswith(_LFS_SUFFIXES) or size > _LFS_MIN_SIZE or b"\0" in sample


def _front_matter(text: str) -> Optional[dict]:
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


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _HubError(400, f"Invalid file path {path!r}")
    return path


def _not_found_repo(repo_id: str) -> _HubError:
    return _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


# --- server ----------------------------------------------------------------------------------


class HubServer:
    """A Hub look-alike bound to ``host:port`` (0 = any free port) storing data under ``root``."""

    def __init__(self, root: pathlib.Path, host: str = "127.0.0.1", port: int = 0):
        self.root = pathlib.Path(root)
        self.host, self.port = host, port
        self.request_log: list[RequestRecord] = []
        self._lock = threading.RLock()
        self._users: dict[str, set[str]] = {}  # user name -> orgs
        self._tokens: dict[str, TokenInfo] = {}
        self._repos: dict[tuple[str, str], Repo] = {}
        self._pending_uploads: dict[str, tuple[tuple[str, str], str, int]] = {}  # signature -> (repo key, oid, size)
        self._upload_limit: Optional[int] = None
        self._uploaded_bytes = 0
        self._fail_commits = False
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "HubServer":
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        # A short poll interval keeps stop() fast (serve_forever checks for shutdown between polls).
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name=f"hubserver:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        # Keep-alive connections would otherwise outlive the server: a later server on the same
        # port would see the client's pooled sockets still answered by this one's threads.
        self._httpd.close_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://{self.host}:{self.port}"

    # --- server-side setup (no HTTP) -----------------------------------------------------------

    def add_user(self, name: str, token: str, *, write: bool = True, orgs: list[str] | tuple[str, ...] = ()) -> None:
        """Register ``token`` for user ``name``; a user may hold several tokens (e.g. one read-only)."""
        with self._lock:
            self._users.setdefault(name, set()).update(orgs)
            self._tokens[token] = TokenInfo(name, write)

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False,
                    owner_token: Optional[str] = None, repo_type: str = "model") -> None:
        """Create a repo with its initial commit (``.gitattributes``), like the Hub does."""
        if owner_token is not None:
            info = self._tokens.get(owner_token)
            if info is None or not self._owns(info.user, repo_id.split("/", 1)[0]):
                raise PermissionError(f"owner_token does not own the namespace of {repo_id}")
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            self._new_repo(repo_type, repo_id, private, gated)

    def add_files(self, repo_id: str, files: dict[str, bytes | pathlib.Path], message: str = "seed",
                  revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit ``{path_in_repo: bytes or local file}`` as one commit; returns its sha.

        A ``revision`` that is not a branch yet is created from main's head.
        """
        entries: dict[str, Optional[FileEntry]] = {}
        for path, value in files.items():
            data = pathlib.Path(value).read_bytes() if isinstance(value, (str, os.PathLike)) else bytes(value)
            entries[_check_path(path)] = self._store_bytes(data, lfs=_wants_lfs(path, len(data), data[:512]))
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            if revision not in repo.refs:
                repo.refs[revision] = repo.refs["main"]
            repo.lfs_objects.update(e.sha256 for e in entries.values() if e is not None and e.lfs)
            return self._apply_commit(repo, revision, entries, message, "").sha

    def upload_dir(self, repo_id: str, folder: pathlib.Path, message: str = "seed", *, repo_type: str = "model") -> str:
        """Commit every file under ``folder`` (recursively, ``.git`` skipped) as one commit."""
        folder = pathlib.Path(folder)
        files: dict[str, bytes | pathlib.Path] = {
            p.relative_to(folder).as_posix(): p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(folder).parts
        }
        return self.add_files(repo_id, files, message, repo_type=repo_type)

    def grant(self, repo_id: str, token: str, *, repo_type: str = "model") -> None:
        """Give the token's user read access to a private or gated repo (access is per user, as on the Hub)."""
        with self._lock:
            info = self._tokens.get(token)
            if info is None:
                raise KeyError("unknown token: add_user() it first")
            self._repo(repo_type, repo_id).grants.add(info.user)

    def fail_uploads_after(self, n_bytes: Optional[int]) -> None:
        """LFS PUTs answer 403 once the bytes received since this call exceed ``n_bytes``; None disables.

        403, not 500: the client retries 5xx with exponential backoff, which would only slow tests down.
        """
        with self._lock:
            self._upload_limit, self._uploaded_bytes = n_bytes, 0

    def fail_commits(self, flag: bool) -> None:
        """While set, ``/commit`` answers 400 and changes nothing."""
        with self._lock:
            self._fail_commits = flag

    # --- assertions --------------------------------------------------------------------------

    def requests_for(self, method: Optional[str] = None, path_contains: Optional[str] = None) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.request_log
                    if (method is None or r.method == method.upper())
                    and (path_contains is None or path_contains in r.path or path_contains in unquote(r.path))]

    def clear_log(self) -> None:
        with self._lock:
            self.request_log.clear()

    def repo_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            files = dict(repo.commits[self._resolve(repo, revision)].files)
        return {path: self._blob(e.sha256).read_bytes() for path, e in sorted(files.items())}

    def commits(self, repo_id: str, *, repo_type: str = "model") -> list[dict]:
        """Every commit of the repo, oldest first, on main, other branches and PR refs."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return [{"sha": c.sha, "parent": c.parent, "branch": c.branch, "message": c.message,
                     "description": c.description, "files_changed": list(c.changed),
                     "files_deleted": list(c.deleted), "date": c.date}
                    for c in repo.commits.values()]

    # --- state (call with the lock held) -------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id}") from None

    def _new_repo(self, repo_type: str, repo_id: str, private: bool, gated: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private, gated, _now())
        self._repos[(repo_type, repo_id)] = repo
        repo.refs["main"] = ""
        self._apply_commit(repo, "main", {".gitattributes": self._store_bytes(_GITATTRIBUTES, lfs=False)},
                           "initial commit", "")
        return repo

    def _owns(self, user: Optional[str], namespace: str) -> bool:
        return user is not None and (user == namespace or namespace in self._users.get(user, set()))

    def _visible(self, repo: Repo, user: Optional[str]) -> bool:
        return not repo.private or self._owns(user, repo.namespace) or user in repo.grants

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if _SHA1.match(revision) and revision in repo.commits:
            return revision
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _apply_commit(self, repo: Repo, branch: str, ops: dict[str, Optional[FileEntry]], message: str,
                      description: str, *, new_branch: Optional[str] = None) -> Commit:
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
        commit = Commit(sha, parent, target, message, description, files, changed, deleted, _now())
        repo.commits[sha] = commit
        repo.refs[target] = sha
        return commit

    # --- blobs -------------------------------------------------------------------------------

    def _blob(self, sha256: str) -> pathlib.Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def _store_bytes(self, data: bytes, *, lfs: bool) -> FileEntry:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self._blob(sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.root / "tmp" / secrets.token_hex(8)
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return self._entry(sha256, len(data), lfs, data if not lfs else None)

    def _entry(self, sha256: str, size: int, lfs: bool, data: Optional[bytes] = None) -> FileEntry:
        if lfs:
            return FileEntry(sha256, size, _git_sha1(_lfs_pointer(sha256, size)), True)
        if data is None:
            data = self._blob(sha256).read_bytes()
        return FileEntry(sha256, size, _git_sha1(data), False)

    # --- HTTP dispatch -----------------------------------------------------------------------

    def _handle(self, h: "_Handler") -> None:
        raw_path, _, query = h.path.partition("?")
        auth = h.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        caller = self._tokens.get(token) if token else None
        headers = {k: ("Bearer ***" if k.lower() == "authorization" else v) for k, v in h.headers.items()}
        record = RequestRecord(h.command, h.path, headers, caller.user if caller else None, bool(auth))
        with self._lock:
            self.request_log.append(record)
        req = _Request(h.command, raw_path.split("/")[1:], parse_qs(query, keep_blank_values=True), h.headers, caller)
        try:
            if req.method == "PUT" and req.segments[:1] == ["lfs-upload"]:
                resp = self._lfs_put(req, _read_body(h))  # streamed: may be large
            else:
                req.body = b"".join(_read_body(h))
                resp = self._route(req, token)
        except _HubError as exc:
            resp = self._error(exc)
        except ConnectionError:
            raise  # the client went away: nothing to answer
        except Exception as exc:  # a server bug: say so loudly
            traceback.print_exc(file=sys.stderr)
            resp = self._error(_HubError(500, f"hubserver internal error: {type(exc).__name__}: {exc}"))
        record.status = resp.status
        _send(h, resp)

    @staticmethod
    def _error(exc: _HubError) -> _Response:
        # Header values must be latin-1 on the wire; keep them to one ASCII line.
        message = exc.message.replace("\n", " ").encode("ascii", "replace").decode()
        headers = {"X-Error-Message": message, **exc.headers}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        return _Response(exc.status, json.dumps({"error": exc.message, **exc.extra}).encode(),
                         {"Content-Type": "application/json", **headers})

    def _route(self, req: _Request, token: Optional[str]) -> _Response:
        seg, m = req.segments, req.method
        if seg[:1] == ["api"]:
            if seg[1:] == ["whoami-v2"] and m == "GET":
                return self._whoami(req, token)
            if seg[1:] == ["agent-harnesses"] and m == "GET":  # the client's best-effort agent detection
                return _json({"standardEnvVars": [], "harnesses": {}})
            if seg[1:] == ["validate-yaml"] and m == "POST":
                return self._validate_yaml(req)
            if seg[1:] == ["repos", "create"] and m == "POST":
                return self._create(req)
            if seg[1:] == ["repos", "delete"] and m == "DELETE":
                return self._delete(req)
            if len(seg) >= 4 and seg[1] in _TYPES:
                key = (_TYPES[seg[1]], f"{unquote(seg[2])}/{unquote(seg[3])}")
                action, rest = (seg[4] if len(seg) > 4 else ""), seg[5:]
                if action == "" and m == "GET":
                    return self._info(req, key, "main")
                if action == "revision" and rest and m == "GET":
                    return self._info(req, key, unquote("/".join(rest)))
                if action == "tree" and rest and m == "GET":
                    return self._tree(req, key, unquote(rest[0]), "/".join(unquote(s) for s in rest[1:]))
                if action == "preupload" and rest and m == "POST":
                    return self._preupload(req, key, unquote("/".join(rest)))
                if action == "commit" and rest and m == "POST":
                    return self._commit(req, key, unquote("/".join(rest)))
        elif len(seg) >= 6 and seg[-4:] == ["info", "lfs", "objects", "batch"] and seg[-5].endswith(".git"):
            # {P}{ns}/{name}.git/info/lfs/objects/batch
            prefix = seg[:-6]
            repo_type = _TYPES.get(prefix[0], "?") if len(prefix) == 1 else ("model" if not prefix else "?")
            if m == "POST" and repo_type != "?":
                return self._lfs_batch(req, (repo_type, f"{unquote(seg[-6])}/{unquote(seg[-5][:-4])}"))
        elif seg[:1] == ["lfs-verify"] and len(seg) == 2 and m == "POST":
            return self._lfs_verify(req, seg[1])
        else:
            resolved = self._parse_resolve(seg)
            if resolved is not None and m in ("GET", "HEAD"):
                return self._resolve_file(req, *resolved)
        # Missing endpoints must be loud: pytest shows this warning with the failing test.
        _log.warning("hubserver: no route for %s /%s", m, "/".join(seg))
        raise _HubError(404, f"hubserver: no route for {m} /{'/'.join(seg)}")

    # --- identity ----------------------------------------------------------------------------

    def _whoami(self, req: _Request, token: Optional[str]) -> _Response:
        if req.caller is None:
            message = "Invalid credentials in Authorization header" if token else "Authorization header is required"
            raise _HubError(401, message)
        name = req.caller.user
        return _json({
            "type": "user", "id": hashlib.sha1(name.encode()).hexdigest()[:24], "name": name, "fullname": name.title(),
            "email": f"{name}@example.com", "emailVerified": True, "isPro": False,
            "avatarUrl": f"{self.url}/avatars/{name}.png",
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write" if req.caller.write else "read"}
                     for o in sorted(self._users.get(name, ()))],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": f"{name}-token", "role": "write" if req.caller.write else "read"}},
        })

    def _validate_yaml(self, req: _Request) -> _Response:
        body = req.json() or {}
        try:
            _front_matter(str(body.get("content") or ""))
        except ValueError as exc:
            # The client reads .json() before checking the status, so errors must be JSON too.
            return _json({"errors": [{"message": str(exc)}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    # --- repos -------------------------------------------------------------------------------

    def _require_writer(self, req: _Request, namespace: str, what: str) -> TokenInfo:
        if req.caller is None:
            raise _HubError(403, f"You must be authenticated with a write token to {what}.")
        if not req.caller.write:
            raise _HubError(403, f"This token is read-only: it cannot {what}. Use a token with write access.")
        if not self._owns(req.caller.user, namespace):
            raise _HubError(403, f"You don't have the rights to {what} (namespace {namespace}).")
        return req.caller

    def _create(self, req: _Request) -> _Response:
        body = req.json() or {}
        name, org = str(body.get("name") or ""), body.get("organization")
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type {repo_type!r}")
        namespace = org or (req.caller.user if req.caller else "")
        if not _NAME.match(name) or (org is not None and not _NAME.match(str(org))):
            raise _HubError(400, f"Invalid repo name {namespace}/{name}")
        if req.caller is None:
            raise _HubError(403, "You must be authenticated with a write token to create a repo.")
        if not req.caller.write:
            raise _HubError(403, "This token is read-only: it cannot create repos. Use a token with write access.")
        if not self._owns(req.caller.user, namespace):
            raise _HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        # 2.x sends "visibility"; 1.x sent "private": accept both.
        private = body.get("visibility") == "private" or body.get("private") is True
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                # create_repo(exist_ok=True) swallows the 409 and then reads "url" from this body.
                raise _HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"url": url})
            self._new_repo(repo_type, repo_id, private, gated=False)
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _delete(self, req: _Request) -> _Response:
        body = req.json() or {}
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or (req.caller.user if req.caller else "")
        repo_id = f"{namespace}/{body.get('name')}"
        with self._lock:
            repo = self._visible_repo(req, (repo_type, repo_id))
            self._require_writer(req, repo.namespace, f"delete {repo_id}")
            del self._repos[(repo_type, repo_id)]
        return _json({})

    def _visible_repo(self, req: _Request, key: tuple[str, str]) -> Repo:
        repo = self._repos.get(key)
        if repo is None or not self._visible(repo, req.caller.user if req.caller else None):
            raise _not_found_repo(key[1])
        return repo

    def _info(self, req: _Request, key: tuple[str, str], revision: str) -> _Response:
        with self._lock:
            repo = self._visible_repo(req, key)
            commit = repo.commits[self._resolve(repo, revision)]
        card: dict = {}
        if "README.md" in commit.files:
            try:
                card = _front_matter(self._blob(commit.files["README.md"].sha256).read_text("utf-8")) or {}
            except (ValueError, UnicodeDecodeError):
                card = {}
        siblings = []
        for path, e in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": path, "size": e.size, "blobId": e.git_oid}
            if e.lfs:
                sib["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": len(_lfs_pointer(e.sha256, e.size))}
            siblings.append(sib)
        tags = [t for t in card.get("tags") or [] if isinstance(t, str)] if isinstance(card.get("tags"), list) else []
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "author": repo.namespace,
            "sha": commit.sha, "private": repo.private, "gated": "manual" if repo.gated else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": tags, "siblings": siblings, "lastModified": commit.date,
            "createdAt": repo.created_at, "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if card:
            info["cardData"] = card
            for k in ("pipeline_tag", "library_name"):
                if isinstance(card.get(k), str):
                    info[k] = card[k]
        if key[0] == "model":
            info["modelId"] = repo.repo_id
        elif key[0] == "space":
            info["sdk"] = card.get("sdk")
        return _json(info)

    def _tree(self, req: _Request, key: tuple[str, str], revision: str, path: str) -> _Response:
        with self._lock:
            repo = self._visible_repo(req, key)
            files = repo.commits[self._resolve(repo, revision)].files
        recursive = req.flag("recursive")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for file_path, e in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            rel_parts = file_path[len(prefix):].split("/")
            for depth in range(1, len(rel_parts)):  # folders on the way
                if depth > 1 and not recursive:
                    break
                folder = prefix + "/".join(rel_parts[:depth])
                oid = hashlib.sha1(f"{revision}:{folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": oid})
            if len(rel_parts) == 1 or recursive:
                item: dict[str, Any] = {"type": "file", "path": file_path, "size": e.size, "oid": e.git_oid}
                if e.lfs:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(_lfs_pointer(e.sha256, e.size))}
                entries[file_path] = item
        if prefix and not entries:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return _json(list(entries.values()))

    # --- downloads ---------------------------------------------------------------------------

    @staticmethod
    def _parse_resolve(seg: list[str]) -> Optional[tuple[tuple[str, str], str, str]]:
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = _TYPES[seg[0]], seg[1:]
        if len(seg) < 5 or seg[2] != "resolve":
            return None
        revision, path_parts = unquote(seg[3]), seg[4:]
        if revision == "refs" and len(path_parts) > 2 and path_parts[0] == "pr":  # unquoted refs/pr/N
            revision, path_parts = f"refs/pr/{path_parts[1]}", path_parts[2:]
        return (repo_type, f"{unquote(seg[0])}/{unquote(seg[1])}"), revision, "/".join(unquote(p) for p in path_parts)

    def _resolve_file(self, req: _Request, key: tuple[str, str], revision: str, path: str) -> _Response:
        with self._lock:
            repo = self._visible_repo(req, key)
            user = req.caller.user if req.caller else None
            if repo.gated and not (self._owns(user, repo.namespace) or user in repo.grants):
                raise _HubError(
                    403, f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                         "authenticated to access it. Please log in.", "GatedRepo")
            sha = self._resolve(repo, revision)
            entry = repo.commits[sha].files.get(path)
        if entry is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size, 200
        wanted = req.headers.get("Range")
        if wanted and req.method == "GET":
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", wanted)
            if match and (match.group(1) or match.group(2)):
                first, last = match.groups()
                if first:
                    start, end = int(first), min(entry.size, int(last) + 1 if last else entry.size)
                else:
                    start, end = max(0, entry.size - int(last)), entry.size
                if start >= entry.size or start >= end:
                    raise _HubError(416, f"Range not satisfiable: {wanted}", headers={
                        "Content-Range": f"bytes */{entry.size}", "X-Repo-Commit": sha})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        return _Response(status, headers=headers, file=self._blob(entry.sha256), file_range=(start, end))

    # --- uploads -----------------------------------------------------------------------------

    def _preupload(self, req: _Request, key: tuple[str, str], revision: str) -> _Response:
        body = req.json() or {}
        with self._lock:
            repo = self._visible_repo(req, key)
            self._require_writer(req, repo.namespace, f"write to {repo.repo_id}")
            files = repo.commits[self._resolve(repo, revision)].files
        out = []
        for item in body.get("files") or []:
            path, size = str(item.get("path")), int(item.get("size") or 0)
            sample = base64.b64decode(item.get("sample") or "")
            existing = files.get(path)
            out.append({"path": path, "uploadMode": "lfs" if _wants_lfs(path, size, sample) else "regular",
                        "shouldIgnore": False, "oid": existing.etag if existing else None})
        return _json({"files": out})

    def _lfs_batch(self, req: _Request, key: tuple[str, str]) -> _Response:
        body = req.json() or {}
        with self._lock:
            repo = self._visible_repo(req, key)
            if body.get("operation") != "upload":
                raise _HubError(400, "hubserver: only the LFS 'upload' operation is supported")
            self._require_writer(req, repo.namespace, f"write to {repo.repo_id}")
            objects = []
            for obj in body.get("objects") or []:
                oid, size = str(obj.get("oid")), int(obj.get("size") or 0)
                if oid in repo.lfs_objects:  # no "actions": the client skips the upload
                    objects.append({"oid": oid, "size": size})
                    continue
                # Pre-signed style: the PUT carries no Authorization, the URL is the credential.
                signature = secrets.token_urlsafe(16)
                self._pending_uploads[signature] = (key, oid, size)
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.url}/lfs-upload/{signature}"},
                    "verify": {"href": f"{self.url}/lfs-verify/{signature}"},
                }})
        return _json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, req: _Request, chunks: Iterator[bytes]) -> _Response:
        with self._lock:
            pending = self._pending_uploads.get(req.segments[1] if len(req.segments) == 2 else "")
        digest, received, failed = hashlib.sha256(), 0, False
        tmp = self.root / "tmp" / secrets.token_hex(8)
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:  # always drain the body, so the connection stays usable
                    received += len(chunk)
                    with self._lock:
                        self._uploaded_bytes += len(chunk)
                        limit = self._upload_limit
                        failed = failed or (limit is not None and self._uploaded_bytes > limit)
                    if pending is not None and not failed:
                        digest.update(chunk)
                        out.write(chunk)
            if pending is None:
                raise _HubError(403, "Invalid or expired upload URL")
            if failed:
                raise _HubError(403, f"injected failure: upload aborted after {self._upload_limit} bytes")
            key, oid, size = pending
            if digest.hexdigest() != oid or received != size:
                raise _HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
            target = self._blob(oid)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            if key in self._repos:
                self._repos[key].lfs_objects.add(oid)
        return _Response(200)

    def _lfs_verify(self, req: _Request, signature: str) -> _Response:
        body = req.json() or {}
        with self._lock:
            pending = self._pending_uploads.get(signature)
            if pending is None:
                raise _HubError(404, "Unknown upload")
            key, oid, size = pending
            repo = self._repos.get(key)
            uploaded = repo is not None and oid in repo.lfs_objects
            if not uploaded or body.get("oid") != oid or int(body.get("size", -1)) != size:
                raise _HubError(400, f"LFS object {oid} was not uploaded")
            del self._pending_uploads[signature]
        return _json({})

    def _commit(self, req: _Request, key: tuple[str, str], revision: str) -> _Response:
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first ndjson line of a commit must be its header")
        header = lines[0].get("value") or {}
        with self._lock:
            repo = self._visible_repo(req, key)
            self._require_writer(req, repo.namespace, f"write to {repo.repo_id}")
            if self._fail_commits:
                raise _HubError(400, "injected failure: commit refused")
            if revision not in repo.refs:
                raise _HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            lfs_objects = set(repo.lfs_objects)
        # Blobs are written before the commit is decided: content-addressed, they stay invisible if it fails.
        ops: dict[str, Optional[FileEntry]] = {}
        deleted_folders: list[str] = []
        for line in lines[1:]:
            kind, value = line.get("key"), line.get("value") or {}
            path = str(value.get("path", ""))
            path = _check_path(path.rstrip("/") if kind == "deletedFolder" else path)
            if kind == "file":
                ops[path] = self._store_bytes(base64.b64decode(value.get("content") or ""), lfs=False)
            elif kind == "lfsFile":
                oid = str(value.get("oid"))
                if oid not in lfs_objects or not self._blob(oid).exists():
                    raise _HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                         f"does not exist: {path} ({oid})")
                ops[path] = self._entry(oid, self._blob(oid).stat().st_size, lfs=True)
            elif kind == "deletedFile":
                ops[path] = None
            elif kind == "deletedFolder":
                deleted_folders.append(path)
            else:
                raise _HubError(400, f"Unknown commit operation {kind!r}")
        with self._lock:
            head = repo.refs[revision]
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise _HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
            current = repo.commits[head].files
            for folder in deleted_folders:
                inside = [p for p in current if p.startswith(folder + "/")]
                if not inside:
                    raise _HubError(404, f"Folder not found: {folder}", "EntryNotFound")
                ops.update({p: None for p in inside if p not in ops})
            for path, entry in ops.items():
                if entry is None and path not in current:
                    raise _HubError(404, f"File not found: {path}", "EntryNotFound")
            pr_number: Optional[int] = None
            if req.flag("create_pr"):
                pr_number, repo.next_pr = repo.next_pr, repo.next_pr + 1
            pr_branch = f"refs/pr/{pr_number}" if pr_number is not None else None
            commit = self._apply_commit(repo, revision, ops, str(header.get("summary") or ""),
                                        str(header.get("description") or ""), new_branch=pr_branch)
        base = f"{self.url}/{_URL_PREFIX[key[0]]}{repo.repo_id}"
        return _json({"success": True, "commitOid": commit.sha, "commitUrl": f"{base}/commit/{commit.sha}",
                      "pullRequestUrl": f"{base}/discussions/{pr_number}" if pr_number is not None else None})


# --- HTTP plumbing ---------------------------------------------------------------------------


def _json(data: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(data).encode(), {"Content-Type": content_type})


def _read_body(h: BaseHTTPRequestHandler) -> Iterator[bytes]:
    """The request body, Content-Length or chunked (httpx streams file uploads chunked)."""
    if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
        while True:
            size = int(h.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return
            yield from _read_exactly(h, size)
            h.rfile.readline()  # CRLF after each chunk
    else:
        yield from _read_exactly(h, int(h.headers.get("Content-Length") or 0))


def _read_exactly(h: BaseHTTPRequestHandler, size: int):
    remaining = size
    while remaining:
        data = h.rfile.read(min(remaining, _CHUNK))
        if not data:
            raise ConnectionError("client closed the connection mid-body")
        remaining -= len(data)
        yield data


def _send(h: BaseHTTPRequestHandler, resp: _Response) -> None:
    length = resp.file_range[1] - resp.file_range[0] if resp.file is not None else len(resp.body)
    try:
        h.send_response(resp.status)
        for name, value in resp.headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if h.command == "HEAD":
            return
        if resp.file is None:
            h.wfile.write(resp.body)
            return
        with open(resp.file, "rb") as f:
            f.seek(resp.file_range[0])
            remaining = length
            while remaining:
                data = f.read(min(remaining, _CHUNK))
                if not data:
                    break
                h.wfile.write(data)
                remaining -= len(data)
    except (BrokenPipeError, ConnectionResetError):
        h.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, hub: HubServer):
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def close_connections(self) -> None:
        with self._connections_lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries Content-Length
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def _dispatch(self) -> None:
        try:
            self.server.hub._handle(self)
        except ConnectionError:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        if _VERBOSE:
            sys.stderr.write(f"hubserver {self.address_string()} {format % args}\n")
