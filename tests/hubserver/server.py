"""The wire: a threaded HTTP/1.1 server around a ``HubState``, with a log of every request it answered."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from .routes import Request, Response, find_route, respond
from .state import HubState
from .throttle import TokenBucket, bucket, env_rate

_VERBOSE = os.environ.get("HUBSERVER_VERBOSE") == "1"
_CHUNK = 1024 * 1024
_SLOW_CHUNK = 256 * 1024


@dataclass
class RequestRecord:
    method: str
    path: str  # with query string
    headers: dict[str, str]  # Authorization redacted to "Bearer ***"
    token_name: str | None  # the user the token maps to, None when anonymous or unknown
    had_auth: bool
    status: int = 0


class HubServer:
    """A Hub look-alike bound to ``host:port`` (0 = any free port) storing data under ``root``.

    Setup and read-back methods (``add_user``, ``create_repo``, ``repo_files``...) act on ``state``
    directly, without HTTP; the client's requests are answered through ``routes``.

    Bandwidth: ``down_bps`` / ``up_bps`` cap what all connections together send and receive, in bytes
    per second (default: ``HUBSERVER_DOWN_BPS`` / ``HUBSERVER_UP_BPS``, unset = unlimited).
    ``sparse_uploads`` keeps uploaded LFS objects as sparse files of their size, after checking their
    sha256: a benchmark can push tens of GB without storing them (their bytes then read as zeros).
    """

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        down_bps: float | None = None,
        up_bps: float | None = None,
        sparse_uploads: bool = False,
    ) -> None:
        self.root = Path(root)
        self.host, self.port = host, port
        self.state = HubState(self.root)
        self.state.sparse_uploads = sparse_uploads
        self.down: TokenBucket | None = bucket(down_bps or env_rate("HUBSERVER_DOWN_BPS"))
        self.up: TokenBucket | None = bucket(up_bps or env_rate("HUBSERVER_UP_BPS"))
        self.request_log: list[RequestRecord] = []
        self._log_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        # The state's own operations, under the names tests have always used.
        self.add_user = self.state.add_user
        self.create_repo = self.state.create_repo
        self.add_files = self.state.add_files
        self.upload_dir = self.state.upload_dir
        self.grant = self.state.grant
        self.fail_uploads_after = self.state.fail_uploads_after
        self.fail_commits = self.state.fail_commits
        self.repo_files = self.state.repo_files
        self.commits = self.state.commits

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> HubServer:
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        self.state.base_url = self.url
        # A short poll interval keeps stop() fast (serve_forever checks for shutdown between polls).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name=f"hubserver:{self.port}", daemon=True
        )
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

    def __enter__(self) -> HubServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://{self.host}:{self.port}"

    # --- the request log -------------------------------------------------------------------------

    def requests_for(self, method: str | None = None, path_contains: str | None = None) -> list[RequestRecord]:
        with self._log_lock:
            return [
                r
                for r in self.request_log
                if (method is None or r.method == method.upper())
                and (path_contains is None or path_contains in r.path or path_contains in unquote(r.path))
            ]

    def clear_log(self) -> None:
        with self._log_lock:
            self.request_log.clear()

    # --- one request -----------------------------------------------------------------------------

    def handle(self, h: _Handler) -> None:
        raw_path, _, query = h.path.partition("?")
        auth = h.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        caller = self.state.caller(token)
        headers = {k: ("Bearer ***" if k.lower() == "authorization" else v) for k, v in h.headers.items()}
        record = RequestRecord(h.command, h.path, headers, caller.user if caller else None, bool(auth))
        with self._log_lock:
            self.request_log.append(record)
        query_args = parse_qs(query, keep_blank_values=True)
        lowered = {k.lower(): v for k, v in h.headers.items()}
        req = Request(h.command, raw_path, query_args, lowered, token, caller)
        found = find_route(h.command, raw_path)
        if found is not None and found[0].streamed:
            req.chunks = _read_body(h)  # may be large: the handler streams it
        else:
            req.body = b"".join(_read_body(h))
        resp = respond(self.state, req, found)
        record.status = resp.status
        _send(h, resp)


def _read_body(h: _Handler) -> Iterator[bytes]:
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


def _read_exactly(h: _Handler, size: int) -> Iterator[bytes]:
    remaining, up = size, h.server.hub.up
    # Small reads when throttled: the client's send then paces with the link (TCP backpressure).
    chunk = _CHUNK if up is None else _SLOW_CHUNK
    while remaining:
        data = h.rfile.read(min(remaining, chunk))
        if not data:
            raise ConnectionError("client closed the connection mid-body")
        if up is not None:
            up.take(len(data))
        remaining -= len(data)
        yield data


def _send(h: _Handler, resp: Response) -> None:
    try:
        h.send_response(resp.status)
        for name, value in resp.headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(resp.length))
        h.end_headers()
        if h.command == "HEAD":
            return
        if resp.file is None:
            h.wfile.write(resp.body)
            return
        down = h.server.hub.down
        chunk = _CHUNK if down is None else _SLOW_CHUNK
        with open(resp.file, "rb") as f:
            f.seek(resp.file_range[0])
            remaining = resp.length
            while remaining:
                data = f.read(min(remaining, chunk))
                if not data:
                    break
                if down is not None:
                    down.take(len(data))
                h.wfile.write(data)
                remaining -= len(data)
    except (BrokenPipeError, ConnectionResetError):
        h.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, hub: HubServer) -> None:
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
            self.server.hub.handle(self)
        except ConnectionError:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        if _VERBOSE:
            sys.stderr.write(f"hubserver {self.address_string()} {format % args}\n")
