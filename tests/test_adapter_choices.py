"""The adapter picker's listing (merge_core.adapter_choices) against the local Hub and local folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from merge_core.adapter import load_adapter_config
from merge_core.adapter_choices import NO_CHOICES, discover_adapters
from merge_core.errors import AdapterConfigError
from merge_core.frontend import LocalPaths
from merge_core.hub import HubClient
from merge_core.hub_files import adapter_files
from merge_core.hub_ids import RepoRef
from tests.conftest import ALICE, BOB
from tests.hubserver import HubServer

CONFIG = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'
WEIGHTS = b"not read by the listing"


def _adapter(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}adapter_config.json": CONFIG, f"{prefix}adapter_model.safetensors": WEIGHTS}


@pytest.fixture
def hub(hub_server: HubServer) -> HubServer:
    repos = {
        "alice/multi": {**_adapter("chat/"), **_adapter("code/"), **_adapter("deep/er/")},
        "alice/peft-layout": {**_adapter(), **_adapter("other/")},
        "alice/single": _adapter(),
        "alice/gated": _adapter("a/"),
        "alice/private": _adapter("a/"),
    }
    for repo_id, files in repos.items():
        hub_server.create_repo(repo_id, gated=repo_id.endswith("gated"), private=repo_id.endswith("private"))
        hub_server.add_files(repo_id, files)
    hub_server.add_files("alice/single", _adapter("later/"), revision="v2")
    return hub_server


def _list(text: str, hub: HubServer, **kwargs: object) -> list[str]:
    local = kwargs.pop("local", LocalPaths(Path("/nonexistent-demo")))
    return discover_adapters(text, endpoint=hub.url, local=local, **kwargs).ids


def test_subfolder_adapters_are_listed_as_ids(hub: HubServer) -> None:
    found = discover_adapters("alice/multi", endpoint=hub.url, local=LocalPaths(Path("/nonexistent-demo")))
    assert found.choices == (
        ("chat", "alice/multi/chat"),
        ("code", "alice/multi/code"),
        ("deep/er", "alice/multi/deep/er"),
    )
    assert found.selected is None


def test_peft_layout_lists_the_top_level_adapter_too(hub: HubServer) -> None:
    assert _list("alice/peft-layout", hub) == ["alice/peft-layout", "alice/peft-layout/other"]


def test_one_adapter_at_the_root_gives_no_picker(hub: HubServer) -> None:
    assert _list("alice/single", hub) == []


def test_a_typed_subfolder_lists_its_siblings_and_is_selected(hub: HubServer) -> None:
    found = discover_adapters(" alice/multi/code ", endpoint=hub.url, local=LocalPaths(Path("/nonexistent-demo")))
    assert found.selected == "alice/multi/code"
    assert "alice/multi/chat" in found.ids


def test_the_revision_is_read_and_kept_in_the_ids(hub: HubServer) -> None:
    assert _list("alice/single", hub, revision="v2") == ["alice/single", "alice/single/later"]
    assert _list("alice/single@v2", hub) == ["alice/single@v2", "alice/single/later@v2"]


@pytest.mark.parametrize(
    "text",
    ["nobody/missing", "alice/private", "not an id", "", "alice/multi, alice/single", "alice/multi:0.5"],
)
def test_what_cannot_be_listed_gives_no_picker_and_no_error(hub: HubServer, text: str) -> None:
    assert _list(text, hub, token=BOB) == []


def test_a_token_with_access_lists_a_private_repo(hub: HubServer) -> None:
    assert _list("alice/private", hub, token=ALICE) == ["alice/private/a"]


def test_a_gated_repo_is_listed_as_on_the_hub(hub: HubServer) -> None:
    # As on the Hub, a gated repo's file list is public; only its files need the accepted conditions.
    assert _list("alice/gated", hub, token=BOB) == ["alice/gated/a"]


def test_local_folders_follow_the_apps_local_path_rule(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    for sub in ("one", "two"):
        (demo / "multi" / sub).mkdir(parents=True)
        (demo / "multi" / sub / "adapter_config.json").write_bytes(CONFIG)
    (demo / "multi" / "notes").mkdir()  # no adapter_config.json: not a choice
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x").mkdir()
    (elsewhere / "x" / "adapter_config.json").write_bytes(CONFIG)

    demo_only = LocalPaths(demo)
    assert discover_adapters("demo/multi", local=demo_only).ids == ["demo/multi/one", "demo/multi/two"]
    assert discover_adapters(str(elsewhere), local=demo_only) == NO_CHOICES  # outside the demo: not read
    assert discover_adapters(f"{elsewhere}/", local=LocalPaths(demo, allow_any=True)).ids == [f"{elsewhere}/x"]


def test_the_merge_names_the_same_subfolders_as_the_picker(hub: HubServer, tmp_path: Path) -> None:
    _, files = HubClient(endpoint=hub.url).resolve(RepoRef("alice/multi"))
    with pytest.raises(AdapterConfigError, match=r"subfolders \(chat, code, deep/er\); pick one .* alice/multi/chat"):
        adapter_files(files, RepoRef("alice/multi"))
    for sub in ("b", "a"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "adapter_config.json").write_bytes(CONFIG)
    with pytest.raises(AdapterConfigError, match="adapters in subfolders: a, b; pick one"):
        load_adapter_config(tmp_path)
