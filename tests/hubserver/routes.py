"""The Hub API's HTTP shapes: one table from (method, path pattern) to a handler, and how answers look.

Handlers parse a request into plain values, call ``operations``, and render JSON or a file. No sockets:
``respond(state, request)`` is the whole HTTP layer short of the wire (see ``server.py``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from . import operations as ops
from .state import HubError, HubState, RepoKey, TokenInfo

_log = logging.getLogger("tests.hubserver")
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_RANGE = re.compile(r"\s*bytes=(\d*)-(\d*)\s*")


@dataclass
class Request:
    method: str
    path: str  # raw (still percent-encoded), without the query string
    query: dict[str, list[str]]
    headers: Mapping[str, str]  # names in lower case
    token: str | None  # the bearer token as sent
    caller: TokenInfo | None  # whom it belongs to; None when anonymous or unknown
    body: bytes = b""
    chunks: Iterator[bytes] = field(default_factory=lambda: iter(()))  # the body of a streamed route

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or [""])[0].lower() in ("1", "true")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # streamed instead of body
    file_range: tuple[int, int] = (0, 0)  # [start, end) within file

    @property
    def length(self) -> int:
        return self.file_range[1] - self.file_range[0] if self.file is not None else len(self.body)


Params = dict[str, str]
Handler = Callable[[HubState, Request, Params], Response]


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Handler
    streamed: bool = False  # the handler reads ``request.chunks`` (large uploads) instead of ``body``


def json_response(data: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": content_type})


def error_response(exc: HubError) -> Response:
    # Header values must be latin-1 on the wire; keep them to one ASCII line.
    message = exc.message.replace("\n", " ").encode("ascii", "replace").decode()
    headers = {"X-Error-Message": message, **exc.headers}
    if exc.code:
        headers["X-Error-Code"] = exc.code
    body = json.dumps({"error": exc.message, **exc.extra}).encode()
    return Response(exc.status, body, {"Content-Type": "application/json", **headers})


def _key(p: Params) -> RepoKey:
    repo_type = _TYPES[p["type"]] if p.get("type") else "model"
    return repo_type, f"{unquote(p['ns'])}/{unquote(p['name'])}"


# --- handlers --------------------------------------------------------------------------------------


def _whoami(state: HubState, req: Request, p: Params) -> Response:
    return json_response(ops.whoami(state, req.caller, had_token=bool(req.token)))


def _agent_harnesses(state: HubState, req: Request, p: Params) -> Response:
    return json_response({"standardEnvVars": [], "harnesses": {}})  # the client's best-effort agent detection


def _validate_yaml(state: HubState, req: Request, p: Params) -> Response:
    errors = ops.validate_yaml(str((req.json() or {}).get("content") or ""))
    # The client reads .json() before checking the status, so errors must be JSON too.
    return json_response({"errors": errors, "warnings": []}, 400 if errors else 200)


def _create(state: HubState, req: Request, p: Params) -> Response:
    return json_response(ops.create_repo(state, req.caller, req.json() or {}))


def _delete(state: HubState, req: Request, p: Params) -> Response:
    return json_response(ops.delete_repo(state, req.caller, req.json() or {}))


def _info(state: HubState, req: Request, p: Params) -> Response:
    revision = unquote(p["rev"]) if p.get("rev") else "main"
    return json_response(ops.repo_info(state, req.caller, _key(p), revision))


def _tree(state: HubState, req: Request, p: Params) -> Response:
    path, recursive = unquote(p.get("path") or ""), req.flag("recursive")
    return json_response(ops.tree(state, req.caller, _key(p), unquote(p["rev"]), path=path, recursive=recursive))


def _preupload(state: HubState, req: Request, p: Params) -> Response:
    files = (req.json() or {}).get("files") or []
    create_pr = req.flag("create_pr")
    return json_response(ops.preupload(state, req.caller, _key(p), unquote(p["rev"]), files, create_pr=create_pr))


def _commit(state: HubState, req: Request, p: Params) -> Response:
    lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
    create_pr = req.flag("create_pr")
    return json_response(ops.commit(state, req.caller, _key(p), unquote(p["rev"]), lines, create_pr=create_pr))


def _lfs_batch(state: HubState, req: Request, p: Params) -> Response:
    answer = ops.lfs_batch(state, req.caller, _key(p), req.json() or {})
    return json_response(answer, content_type="application/vnd.git-lfs+json")


def _lfs_put(state: HubState, req: Request, p: Params) -> Response:
    ops.lfs_put(state, p["signature"], req.chunks)
    return Response(200)


def _lfs_verify(state: HubState, req: Request, p: Params) -> Response:
    return json_response(ops.lfs_verify(state, p["signature"], req.json() or {}))


def _byte_range(wanted: str, size: int, commit: str) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` as [start, end); None when the header asks for nothing usable."""
    match = _RANGE.fullmatch(wanted)
    if not match or not (match.group(1) or match.group(2)):
        return None
    first, last = match.groups()
    if first:
        start, end = int(first), min(size, int(last) + 1 if last else size)
    else:
        start, end = max(0, size - int(last)), size
    if start >= size or start >= end:
        headers = {"Content-Range": f"bytes */{size}", "X-Repo-Commit": commit}
        raise HubError(416, f"Range not satisfiable: {wanted}", headers=headers)
    return start, end


def _resolve(state: HubState, req: Request, p: Params) -> Response:
    found = ops.resolve_file(state, req.caller, _key(p), unquote(p["rev"]), unquote(p["path"]))
    entry = found.entry
    headers = {
        "X-Repo-Commit": found.commit,
        "ETag": f'"{entry.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    if entry.lfs:
        headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
    wanted = req.headers.get("range")
    span = _byte_range(wanted, entry.size, found.commit) if wanted and req.method == "GET" else None
    if span is None:
        return Response(200, headers=headers, file=state.blobs.path(entry.sha256), file_range=(0, entry.size))
    headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{entry.size}"
    return Response(206, headers=headers, file=state.blobs.path(entry.sha256), file_range=span)


# --- the table -------------------------------------------------------------------------------------

_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API_REPO = rf"/api/(?P<type>models|datasets|spaces)/{_REPO}"
_WEB_REPO = r"/(?:(?P<type>datasets|spaces)/)?" + _REPO  # a model has no prefix on web paths
_GIT_REPO = r"/(?:(?P<type>models|datasets|spaces)/)?" + _REPO


def _route(methods: str, pattern: str, handler: Handler, *, streamed: bool = False) -> Route:
    return Route(frozenset(methods.split()), re.compile(pattern), handler, streamed)


ROUTES: tuple[Route, ...] = (
    _route("GET", r"/api/whoami-v2", _whoami),
    _route("GET", r"/api/agent-harnesses", _agent_harnesses),
    _route("POST", r"/api/validate-yaml", _validate_yaml),
    _route("POST", r"/api/repos/create", _create),
    _route("DELETE", r"/api/repos/delete", _delete),
    _route("GET", rf"{_API_REPO}/?", _info),
    _route("GET", rf"{_API_REPO}/revision/(?P<rev>.+)", _info),
    _route("GET", rf"{_API_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", _tree),
    _route("POST", rf"{_API_REPO}/preupload/(?P<rev>.+)", _preupload),
    _route("POST", rf"{_API_REPO}/commit/(?P<rev>.+)", _commit),
    _route("POST", rf"{_GIT_REPO}\.git/info/lfs/objects/batch", _lfs_batch),
    _route("PUT", r"/lfs-upload/(?P<signature>[^/]+)", _lfs_put, streamed=True),
    _route("POST", r"/lfs-verify/(?P<signature>[^/]+)", _lfs_verify),
    # An unquoted refs/pr/N revision takes three segments; a file path must follow it.
    _route("GET HEAD", rf"(?!/api/){_WEB_REPO}/resolve/(?P<rev>refs/pr/[^/]+(?=/)|[^/]+)/(?P<path>.*)", _resolve),
)


def find_route(method: str, path: str) -> tuple[Route, Params] | None:
    for route in ROUTES:
        match = route.pattern.fullmatch(path)
        if match and method in route.methods:
            return route, {k: v for k, v in match.groupdict().items() if v is not None}
    return None


def respond(state: HubState, req: Request, found: tuple[Route, Params] | None) -> Response:
    """The answer to one request; refusals become Hub errors, server bugs a loud 500."""
    try:
        if found is None:
            # Missing endpoints must be loud: pytest shows this warning with the failing test.
            _log.warning("hubserver: no route for %s %s", req.method, req.path)
            raise HubError(404, f"hubserver: no route for {req.method} {req.path}")
        route, params = found
        return route.handler(state, req, params)
    except HubError as exc:
        return error_response(exc)
    except ConnectionError:
        raise  # the client went away: nothing to answer
    except Exception as exc:  # noqa: BLE001 - any other failure is a server bug, answered as a loud 500
        traceback.print_exc(file=sys.stderr)
        return error_response(HubError(500, f"hubserver internal error: {type(exc).__name__}: {exc}"))
