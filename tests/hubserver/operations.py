"""The Hub API's operations over a ``HubState``: plain values in, JSON-ready values out, ``HubError`` on refusal.

One function per endpoint; the HTTP layer (``routes.py``) only parses requests and renders answers.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import auth
from .blobs import FileEntry, front_matter, wants_lfs
from .state import REPO_TYPES, HubError, HubState, PendingUpload, RepoKey, TokenInfo, check_path

URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class ResolvedFile:
    """What a resolve request points at: the commit it was read from and the file's entry."""

    commit: str
    entry: FileEntry


# --- identity and cards ----------------------------------------------------------------------------


def whoami(state: HubState, caller: TokenInfo | None, *, had_token: bool) -> dict:
    if caller is None:
        message = "Invalid credentials in Authorization header" if had_token else "Authorization header is required"
        raise HubError(401, message)
    # A classic read token reads as a read role everywhere; other tokens show the user's own (write) role.
    name, role = caller.user, "read" if caller.kind == "classic" and not caller.write else "write"
    orgs = [{"type": "org", "name": o, "fullname": o, "roleInOrg": role} for o in sorted(state.users.get(name, ()))]
    return {
        "type": "user",
        "id": hashlib.sha1(name.encode()).hexdigest()[:24],
        "name": name,
        "fullname": name.title(),
        "email": f"{name}@example.com",
        "emailVerified": True,
        "isPro": False,
        "avatarUrl": f"{state.base_url}/avatars/{name}.png",
        "orgs": orgs,
        "auth": auth.whoami_auth(state, caller),
    }


def validate_yaml(content: str) -> list[dict]:
    """The errors the Hub would report for a README's metadata (empty when it is fine)."""
    try:
        front_matter(content)
    except ValueError as exc:
        return [{"message": str(exc)}]
    return []


# --- repos -----------------------------------------------------------------------------------------


def create_repo(state: HubState, caller: TokenInfo | None, body: dict) -> dict:
    name, org = str(body.get("name") or ""), body.get("organization")
    repo_type = body.get("type") or "model"
    if repo_type not in REPO_TYPES:
        raise HubError(400, f"Invalid repo type {repo_type!r}")
    namespace = org or (caller.user if caller else "")
    if not _NAME.match(name) or (org is not None and not _NAME.match(str(org))):
        raise HubError(400, f"Invalid repo name {namespace}/{name}")
    caller = auth.require_create(state, caller, namespace, repo_type)
    # 2.x sends "visibility"; 1.x sent "private": accept both.
    private = body.get("visibility") == "private" or body.get("private") is True
    repo_id = f"{namespace}/{name}"
    url = f"{state.base_url}/{URL_PREFIX[repo_type]}{repo_id}"
    with state.lock:
        if (repo_type, repo_id) in state.repos:
            # create_repo(exist_ok=True) swallows the 409 and then reads "url" from this body.
            raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"url": url})
        state.new_repo(repo_type, repo_id, private=private, gated=False).created_by_app = caller.app
    return {"url": url, "name": repo_id, "id": repo_id}


def delete_repo(state: HubState, caller: TokenInfo | None, body: dict) -> dict:
    repo_type = body.get("type") or "model"
    namespace = body.get("organization") or (caller.user if caller else "")
    repo_id = f"{namespace}/{body.get('name')}"
    with state.lock:
        repo = state.visible_repo(caller, (repo_type, repo_id))
        auth.require_write(state, caller, repo, f"delete {repo_id}")
        del state.repos[(repo_type, repo_id)]
    return {}


def _card(state: HubState, files: dict[str, FileEntry]) -> dict:
    if "README.md" not in files:
        return {}
    try:
        return front_matter(state.blobs.read(files["README.md"].sha256).decode("utf-8")) or {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _sibling(path: str, e: FileEntry) -> dict[str, Any]:
    sibling: dict[str, Any] = {"rfilename": path, "size": e.size, "blobId": e.git_oid}
    if e.lfs:
        sibling["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": e.pointer_size}
    return sibling


def repo_info(state: HubState, caller: TokenInfo | None, key: RepoKey, revision: str) -> dict:
    with state.lock:
        repo = state.visible_repo(caller, key)
        commit = repo.commits[state.resolve(repo, revision)]
    card = _card(state, commit.files)
    tags = [t for t in card.get("tags") or [] if isinstance(t, str)] if isinstance(card.get("tags"), list) else []
    info: dict[str, Any] = {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": repo.namespace,
        "sha": commit.sha,
        "private": repo.private,
        "gated": "manual" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": tags,
        "siblings": [_sibling(path, e) for path, e in sorted(commit.files.items())],
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "usedStorage": sum(e.size for e in commit.files.values()),
    }
    if card:
        info["cardData"] = card
        info.update({k: card[k] for k in ("pipeline_tag", "library_name") if isinstance(card.get(k), str)})
    if key[0] == "model":
        info["modelId"] = repo.repo_id
    elif key[0] == "space":
        info["sdk"] = card.get("sdk")
    return info


def tree(
    state: HubState, caller: TokenInfo | None, key: RepoKey, revision: str, *, path: str, recursive: bool
) -> list[dict]:
    with state.lock:
        repo = state.visible_repo(caller, key)
        files = repo.commits[state.resolve(repo, revision)].files
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    entries: dict[str, dict] = {}
    for file_path, e in sorted(files.items()):
        if not file_path.startswith(prefix):
            continue
        rel_parts = file_path[len(prefix) :].split("/")
        for depth in range(1, len(rel_parts)):  # folders on the way
            if depth > 1 and not recursive:
                break
            folder = prefix + "/".join(rel_parts[:depth])
            oid = hashlib.sha1(f"{revision}:{folder}".encode()).hexdigest()
            entries.setdefault(folder, {"type": "directory", "path": folder, "oid": oid})
        if len(rel_parts) == 1 or recursive:
            item: dict[str, Any] = {"type": "file", "path": file_path, "size": e.size, "oid": e.git_oid}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
            entries[file_path] = item
    if prefix and not entries:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
    return list(entries.values())


def resolve_file(state: HubState, caller: TokenInfo | None, key: RepoKey, revision: str, path: str) -> ResolvedFile:
    with state.lock:
        repo = state.visible_repo(caller, key)
        state.check_gate(caller, repo)
        sha = state.resolve(repo, revision)
        entry = repo.commits[sha].files.get(path)
    if entry is None:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
    return ResolvedFile(sha, entry)


# --- uploads ---------------------------------------------------------------------------------------


def preupload(
    state: HubState, caller: TokenInfo | None, key: RepoKey, revision: str, files: list[dict], *, create_pr: bool
) -> dict:
    with state.lock:
        repo = state.visible_repo(caller, key)
        auth.require_write(state, caller, repo, f"write to {repo.repo_id}", write=not create_pr, pr=create_pr)
        current = repo.commits[state.resolve(repo, revision)].files
    out = []
    for item in files:
        path, size = str(item.get("path")), int(item.get("size") or 0)
        sample = base64.b64decode(item.get("sample") or "")
        existing = current.get(path)
        mode = "lfs" if wants_lfs(path, size, sample) else "regular"
        out.append(
            {"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": existing.etag if existing else None}
        )
    return {"files": out}


def lfs_batch(state: HubState, caller: TokenInfo | None, key: RepoKey, body: dict) -> dict:
    with state.lock:
        repo = state.visible_repo(caller, key)
        if body.get("operation") != "upload":
            raise HubError(400, "hubserver: only the LFS 'upload' operation is supported")
        # The batch does not say whether a pull request follows: whoever may open one may upload.
        auth.require_write(state, caller, repo, f"write to {repo.repo_id}", pr=True)
        objects = []
        for obj in body.get("objects") or []:
            oid, size = str(obj.get("oid")), int(obj.get("size") or 0)
            if oid in repo.lfs_objects:  # no "actions": the client skips the upload
                objects.append({"oid": oid, "size": size})
                continue
            # Pre-signed style: the PUT carries no Authorization, the URL is the credential.
            signature = secrets.token_urlsafe(16)
            state.pending_uploads[signature] = PendingUpload(key, oid, size)
            actions = {
                "upload": {"href": f"{state.base_url}/lfs-upload/{signature}"},
                "verify": {"href": f"{state.base_url}/lfs-verify/{signature}"},
            }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
    return {"transfer": "basic", "objects": objects}


def lfs_put(state: HubState, signature: str, chunks: Iterable[bytes]) -> None:
    """Store an uploaded object after checking its sha256 and size; the body is always drained."""
    with state.lock:
        pending = state.pending_uploads.get(signature)
    digest, received, failed = hashlib.sha256(), 0, False
    tmp = state.blobs.temp_path()
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:  # always drain the body, so the connection stays usable
                received += len(chunk)
                failed = state.count_upload(len(chunk)) or failed
                if pending is not None and not failed:
                    digest.update(chunk)
                    if not state.sparse_uploads:
                        out.write(chunk)
        if pending is None:
            raise HubError(403, "Invalid or expired upload URL")
        if failed:
            raise HubError(403, f"injected failure: upload aborted after {state.upload_limit} bytes")
        if digest.hexdigest() != pending.oid or received != pending.size:
            raise HubError(400, f"Uploaded content does not match oid {pending.oid} / size {pending.size}")
        if not state.sparse_uploads:
            state.blobs.adopt(tmp, pending.oid)
        elif not state.blobs.path(pending.oid).exists():  # a stored blob keeps its real bytes
            os.truncate(tmp, received)  # the size without the bytes (see HubServer's sparse_uploads)
            state.blobs.adopt(tmp, pending.oid)
    finally:
        tmp.unlink(missing_ok=True)
    with state.lock:
        if pending.key in state.repos:
            state.repos[pending.key].lfs_objects.add(pending.oid)


def lfs_verify(state: HubState, signature: str, body: dict) -> dict:
    with state.lock:
        pending = state.pending_uploads.get(signature)
        if pending is None:
            raise HubError(404, "Unknown upload")
        repo = state.repos.get(pending.key)
        uploaded = repo is not None and pending.oid in repo.lfs_objects
        if not uploaded or body.get("oid") != pending.oid or int(body.get("size", -1)) != pending.size:
            raise HubError(400, f"LFS object {pending.oid} was not uploaded")
        del state.pending_uploads[signature]
    return {}


# --- commits ---------------------------------------------------------------------------------------


@dataclass
class _Operations:
    files: dict[str, FileEntry | None]  # None deletes
    deleted_folders: list[str]


def _read_operations(state: HubState, lines: list[dict], lfs_objects: set[str]) -> _Operations:
    # Blobs are written before the commit is decided: content-addressed, they stay invisible if it fails.
    ops = _Operations({}, [])
    for line in lines:
        kind, value = line.get("key"), line.get("value") or {}
        path = str(value.get("path", ""))
        path = check_path(path.rstrip("/") if kind == "deletedFolder" else path)
        if kind == "file":
            ops.files[path] = state.blobs.store(base64.b64decode(value.get("content") or ""), lfs=False)
        elif kind == "lfsFile":
            oid = str(value.get("oid"))
            if oid not in lfs_objects or not state.blobs.path(oid).exists():
                raise HubError(
                    400,
                    "Your push was rejected because an LFS pointer pointed to a file that "
                    f"does not exist: {path} ({oid})",
                )
            ops.files[path] = state.blobs.entry(oid, state.blobs.path(oid).stat().st_size, lfs=True)
        elif kind == "deletedFile":
            ops.files[path] = None
        elif kind == "deletedFolder":
            ops.deleted_folders.append(path)
        else:
            raise HubError(400, f"Unknown commit operation {kind!r}")
    return ops


def _expand_deletions(ops: _Operations, current: dict[str, FileEntry]) -> None:
    for folder in ops.deleted_folders:
        inside = [p for p in current if p.startswith(folder + "/")]
        if not inside:
            raise HubError(404, f"Folder not found: {folder}", "EntryNotFound")
        ops.files.update({p: None for p in inside if p not in ops.files})
    for path, entry in ops.files.items():
        if entry is None and path not in current:
            raise HubError(404, f"File not found: {path}", "EntryNotFound")


def commit(
    state: HubState, caller: TokenInfo | None, key: RepoKey, revision: str, lines: list[dict], *, create_pr: bool
) -> dict:
    """An ndjson commit (header line first); with ``create_pr`` it lands on a new ``refs/pr/N``."""
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "The first ndjson line of a commit must be its header")
    header = lines[0].get("value") or {}
    # 1. Who may write, and where.
    with state.lock:
        repo = state.visible_repo(caller, key)
        auth.require_write(state, caller, repo, f"write to {repo.repo_id}", write=not create_pr, pr=create_pr)
        if state.commits_fail:
            raise HubError(400, "injected failure: commit refused")
        if revision not in repo.refs:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        lfs_objects = set(repo.lfs_objects)
    # 2. The operations, with their blobs stored.
    ops = _read_operations(state, lines[1:], lfs_objects)
    # 3. Checks against the head, then one swap.
    with state.lock:
        head = repo.refs[revision]
        parent = header.get("parentCommit")
        if parent and parent != head:
            raise HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
        _expand_deletions(ops, repo.commits[head].files)
        pr_number: int | None = None
        if create_pr:
            pr_number, repo.next_pr = repo.next_pr, repo.next_pr + 1
        made = state.apply_commit(
            repo,
            revision,
            ops.files,
            message=str(header.get("summary") or ""),
            description=str(header.get("description") or ""),
            new_branch=f"refs/pr/{pr_number}" if pr_number is not None else None,
        )
    base = f"{state.base_url}/{URL_PREFIX[key[0]]}{repo.repo_id}"
    return {
        "success": True,
        "commitOid": made.sha,
        "commitUrl": f"{base}/commit/{made.sha}",
        "pullRequestUrl": f"{base}/discussions/{pr_number}" if pr_number is not None else None,
    }
