"""Test-session environment and the fixtures several test modules share.

huggingface_hub freezes HF_ENDPOINT and the Xet switch at import time, so the local Hub
test server's address is chosen here, first, and the server is bound to it later
(``start_hub(root, port=HUB_PORT)``).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SESSION_HOME = Path(tempfile.mkdtemp(prefix="lms-hf-home-"))
HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_UPDATE_CHECK"] = "1"
os.environ["HF_HOME"] = str(_SESSION_HOME)
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Imported after the environment above: these modules (and what they import) read it.
import pytest  # noqa: E402

from tests.factories import make_adapter, make_base  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402

ALICE = "hf_alice_write_token_0123456789"
ALICE_READ = "hf_alice_read_token_0123456789"
BOB = "hf_bob_write_token_0123456789"


@dataclass(frozen=True)
class HubUser:
    name: str
    token: str
    write: bool = True
    orgs: tuple[str, ...] = ()


DEFAULT_USERS = (HubUser("alice", ALICE), HubUser("alice", ALICE_READ, write=False), HubUser("bob", BOB))


def start_hub(root: Path, *, port: int = 0, users: Sequence[HubUser] = DEFAULT_USERS) -> HubServer:
    """A started local Hub under ``root`` with ``users``; port 0 picks a free one (HUB_PORT is HF_ENDPOINT's)."""
    server = HubServer(root, port=port).start()
    for user in users:
        server.add_user(user.name, user.token, write=user.write, orgs=user.orgs)
    return server


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubServer]:
    """A local Hub of this test alone, on a free port, with DEFAULT_USERS."""
    server = start_hub(tmp_path / "hub")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Llama (factories.make_base). Shared by the whole session: copy it before changing it."""
    return make_base(tmp_path_factory.mktemp("tiny-base") / "base", "llama")


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A LoRA on tiny_base's q_proj and v_proj. Shared by the whole session: copy it before changing it."""
    return make_adapter(
        tiny_base, tmp_path_factory.mktemp("tiny-adapter") / "adapter", target_modules=["q_proj", "v_proj"]
    )
