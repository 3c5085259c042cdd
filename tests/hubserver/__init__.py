"""A local, Hugging Face Hub-compatible HTTP server for tests (standard library only).

It speaks the subset of the Hub HTTP API that the real ``huggingface_hub`` client (2.x, with
``HF_HUB_DISABLE_XET=1``), transformers and peft use: whoami, repo create/delete, model info,
tree listing, file resolve (HEAD/GET/Range), validate-yaml, preupload, the LFS batch/PUT/verify
protocol and ndjson commits, including pull requests (``refs/pr/N``), private and gated repos.

    server = HubServer(tmp_path).start()
    server.add_user("alice", "hf_alice", write=True)
    HfApi(endpoint=server.url, token="hf_alice").create_repo("alice/model")

Where each part lives:

* ``blobs``: file bytes on disk, content-addressed by sha256; git/LFS naming of one file.
* ``state``: the Hub's memory (users, tokens, repos, commits, access rules, injected failures), no sockets.
* ``auth``: what each token may do (classic read/write, OAuth scopes, fine-grained permissions) and how
  whoami-v2 shows it; enforced on repo creation, preupload, the LFS batch and commits.
* ``operations``: one function per Hub API operation over the state; plain values in and out.
* ``routes``: the HTTP shapes, a table from (method, path pattern) to handler; ``respond`` needs no socket.
* ``server``: the threaded HTTP server, the request log, and ``HubServer``, which ties it all together.

A commit becomes visible only when ``/commit`` succeeds, so uploaded-but-uncommitted LFS objects
never show in a repo. Set ``HUBSERVER_VERBOSE=1`` to print one line per request.
"""

from .blobs import BlobStore, FileEntry
from .routes import ROUTES, Request, Response, find_route, respond
from .server import HubServer, RequestRecord
from .state import Commit, HubError, HubState, Repo, TokenInfo

__all__ = [
    "ROUTES",
    "BlobStore",
    "Commit",
    "FileEntry",
    "HubError",
    "HubServer",
    "HubState",
    "Repo",
    "Request",
    "RequestRecord",
    "Response",
    "TokenInfo",
    "find_route",
    "respond",
]
