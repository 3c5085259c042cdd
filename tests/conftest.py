"""Test-session environment and the fixtures several test modules share.

huggingface_hub freezes HF_ENDPOINT and the Xet switch at import time, so the local Hub
test server's address is chosen here, first, and the server is bound to it later
(``start_hub(root, port=HUB_PORT)``).
"""

from __future__ import annotations

import json
import os
import shutil
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


def with_config(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of adapter folder ``src`` at ``dst`` with ``changes`` applied to its adapter_config.json."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="session")
def adapter_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Several adapters of one tiny Llama, for combinations (read-only: copy before changing one).

    a1/a2/a3: rank 4, partly different targets, different alphas (a2 uses rsLoRA, a1 replaces lm_head);
    d: rank 6 with an embedding LoRA; a1_init/a3_gauss: a1/a3 with other PEFT init settings.
    """
    t = tmp_path_factory.mktemp("adapter-set")
    base = make_base(t / "base", "llama")
    e = {"base": base, "root": t}
    e["a1"] = make_adapter(
        base,
        t / "a1",
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    e["a2"] = make_adapter(
        base, t / "a2", seed=2, r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"]
    )
    e["a3"] = make_adapter(base, t / "a3", seed=3, r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "v_proj"])
    e["d"] = make_adapter(
        base, t / "d", seed=4, r=6, lora_alpha=12, target_modules=["q_proj", "gate_proj", "embed_tokens"]
    )
    # The same weights, but PEFT initialises the new adapter differently (RNG draws before dare's masks).
    e["a1_init"] = with_config(e["a1"], t / "a1_init", init_lora_weights=True)
    e["a3_gauss"] = with_config(e["a3"], t / "a3_gauss", init_lora_weights="gaussian")
    return e
