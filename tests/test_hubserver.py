"""The local Hub test server, driven by the real huggingface_hub client (and transformers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.conftest import ALICE, BOB
from tests.conftest import ALICE_READ as ALICE_RO
from tests.hubserver import HubServer

CONFIG = json.dumps(
    {
        "model_type": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "vocab_size": 64,
    }
).encode()
README = b"---\nlicense: apache-2.0\npipeline_tag: text-generation\ntags:\n- tiny\n---\n# Tiny\n"


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read at call time: a local server cannot speak Xet, whatever the import-time env said.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub(hub_server: HubServer) -> HubServer:
    hub_server.add_user("alice", ALICE, orgs=["acme"])  # alice also owns the acme org here
    return hub_server


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_bytes(README)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "model.safetensors").write_bytes(os.urandom(2 * 1024 * 1024))
    return folder


def api(hub: HubServer, token: str | bool = ALICE) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def seed(hub: HubServer, repo_id: str, **kwargs) -> dict[str, bytes]:
    files = {"config.json": CONFIG, "README.md": README, "model.safetensors": os.urandom(4096)}
    hub.create_repo(repo_id, **kwargs)
    hub.add_files(repo_id, files)
    return files


def test_whoami(hub: HubServer) -> None:
    me = api(hub).whoami()
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    assert [o["name"] for o in me["orgs"]] == ["acme"]
    assert api(hub, ALICE_RO).whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as err:
        api(hub, "hf_not_a_token").whoami()
    assert err.value.response.status_code == 401


def test_create_repo(hub: HubServer) -> None:
    url = api(hub).create_repo("alice/new", private=True)
    assert url.repo_id == "alice/new" and url == f"{hub.url}/alice/new"
    assert api(hub).model_info("alice/new").private is True
    assert api(hub).create_repo("acme/org-model").repo_id == "acme/org-model"  # an org of alice
    with pytest.raises(HfHubHTTPError) as err:
        api(hub).create_repo("alice/new")
    assert err.value.response.status_code == 409
    assert api(hub).create_repo("alice/new", exist_ok=True).repo_id == "alice/new"
    with pytest.raises(HfHubHTTPError) as err:
        api(hub).create_repo("bob/not-alices")
    assert err.value.response.status_code == 403
    assert "namespace bob" in str(err.value)
    assert not api(hub, BOB).repo_exists("bob/not-alices")


def test_upload_folder_is_one_commit_and_downloads_back(hub: HubServer, model_dir: Path, tmp_path: Path) -> None:
    client = api(hub)
    client.create_repo("alice/tiny")
    hub.clear_log()
    info = client.upload_folder(repo_id="alice/tiny", folder_path=model_dir, commit_message="add model")
    assert len(info.oid) == 40 and info.commit_url.endswith(info.oid)

    assert len(hub.requests_for("POST", "/commit/")) == 1
    assert len(hub.requests_for("POST", "/info/lfs/objects/batch")) == 1
    assert len(hub.requests_for("PUT")) == 1 and len(hub.requests_for("POST", "/lfs-verify/")) == 1
    assert not [r for r in hub.requests_for("PUT") if r.had_auth]  # pre-signed style upload
    assert hub.commits("alice/tiny")[-1]["files_changed"] == ["README.md", "config.json", "model.safetensors"]

    expected = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert {k: v for k, v in hub.repo_files("alice/tiny").items() if k != ".gitattributes"} == expected
    one = hf_hub_download("alice/tiny", "model.safetensors", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c1")
    assert Path(one).read_bytes() == expected["model.safetensors"]
    snap = Path(snapshot_download("alice/tiny", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c2"))
    assert {name: (snap / name).read_bytes() for name in expected} == expected

    assert sorted(client.list_repo_files("alice/tiny")) == [".gitattributes", *sorted(expected)]
    model = client.model_info("alice/tiny", files_metadata=True)
    assert model.sha == info.oid
    assert model.card_data.license == "apache-2.0" and model.pipeline_tag == "text-generation"
    siblings = {s.rfilename: s for s in model.siblings}
    assert siblings["model.safetensors"].lfs is not None and siblings["config.json"].lfs is None
    assert siblings["model.safetensors"].size == 2 * 1024 * 1024
    assert client.file_exists("alice/tiny", "config.json")
    assert not client.file_exists("alice/tiny", "nope.json")

    # Re-uploading the same folder finds nothing to change: no new commit.
    hub.clear_log()
    client.upload_folder(repo_id="alice/tiny", folder_path=model_dir)
    assert hub.requests_for("POST", "/commit/") == [] and hub.requests_for("PUT") == []


def test_tree_subfolder_and_range_reads(hub: HubServer) -> None:
    hub.create_repo("alice/nested")
    hub.add_files("alice/nested", {"a/b/c.json": b"{}", "a/d.bin": b"\0" * 10, "top.txt": b"hi"})
    client = api(hub)
    top = {e.path: type(e).__name__ for e in client.list_repo_tree("alice/nested")}
    assert top == {".gitattributes": "RepoFile", "a": "RepoFolder", "top.txt": "RepoFile"}
    assert sorted(e.path for e in client.list_repo_tree("alice/nested", path_in_repo="a")) == ["a/b", "a/d.bin"]
    deep = [e.path for e in client.list_repo_tree("alice/nested", path_in_repo="a", recursive=True)]
    assert "a/b/c.json" in deep
    with pytest.raises(EntryNotFoundError):
        list(client.list_repo_tree("alice/nested", path_in_repo="missing"))

    from huggingface_hub.utils import get_session

    url = f"{hub.url}/alice/nested/resolve/main/top.txt"
    part = get_session().get(url, headers={"Range": "bytes=1-"})
    assert part.status_code == 206 and part.content == b"i"
    assert part.headers["Content-Range"] == "bytes 1-1/2"


def test_private_repo(hub: HubServer, tmp_path: Path) -> None:
    files = seed(hub, "acme/secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        api(hub, token=False).model_info("acme/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/secret", "config.json", endpoint=hub.url, token=False, cache_dir=tmp_path / "c0")
    assert not api(hub, token=False).repo_exists("acme/secret")
    assert api(hub, ALICE_RO).model_info("acme/secret").private  # owner through the org, read token
    with pytest.raises(RepositoryNotFoundError):
        api(hub, BOB).list_repo_files("acme/secret")
    hub.grant("acme/secret", BOB)
    got = hf_hub_download("acme/secret", "config.json", endpoint=hub.url, token=BOB, cache_dir=tmp_path / "c1")
    assert Path(got).read_bytes() == files["config.json"]


def test_gated_repo(hub: HubServer, tmp_path: Path) -> None:
    seed(hub, "acme/gated", gated=True)
    info = api(hub, token=False).model_info("acme/gated")  # metadata is public
    assert info.gated == "manual"
    with pytest.raises(GatedRepoError, match="restricted"):
        hf_hub_download("acme/gated", "config.json", endpoint=hub.url, token=BOB, cache_dir=tmp_path / "c0")
    with pytest.raises(GatedRepoError):
        snapshot_download("acme/gated", endpoint=hub.url, token=False, cache_dir=tmp_path / "c1")
    hub.grant("acme/gated", BOB)
    hf_hub_download("acme/gated", "config.json", endpoint=hub.url, token=BOB, cache_dir=tmp_path / "c2")
    hf_hub_download("acme/gated", "config.json", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c3")  # owner


def test_missing_revision_and_file(hub: HubServer, tmp_path: Path) -> None:
    seed(hub, "alice/m")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/m", "config.json", revision="v9", endpoint=hub.url, cache_dir=tmp_path / "c0")
    with pytest.raises(RevisionNotFoundError):
        api(hub).model_info("alice/m", revision="v9")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/m", "missing.json", endpoint=hub.url, cache_dir=tmp_path / "c1")
    with pytest.raises(RepositoryNotFoundError):
        api(hub).model_info("alice/does-not-exist")
    sha = api(hub).model_info("alice/m").sha
    assert api(hub).model_info("alice/m", revision=sha).sha == sha


def test_failed_upload_changes_nothing(hub: HubServer, model_dir: Path) -> None:
    seed(hub, "alice/m")
    before_files, before_commits = hub.repo_files("alice/m"), hub.commits("alice/m")
    hub.fail_uploads_after(1000)
    with pytest.raises(RuntimeError, match="model.safetensors") as err:  # the client wraps LFS upload errors
        api(hub).upload_folder(repo_id="alice/m", folder_path=model_dir)
    assert isinstance(err.value.__cause__, HfHubHTTPError) and "injected failure" in str(err.value.__cause__)
    assert hub.requests_for("POST", "/commit/") == []
    hub.fail_uploads_after(None)
    assert hub.repo_files("alice/m") == before_files and hub.commits("alice/m") == before_commits

    hub.fail_commits(True)
    with pytest.raises(HfHubHTTPError, match="injected failure"):
        api(hub).upload_folder(repo_id="alice/m", folder_path=model_dir)
    assert hub.repo_files("alice/m") == before_files and hub.commits("alice/m") == before_commits
    hub.fail_commits(False)
    api(hub).upload_folder(repo_id="alice/m", folder_path=model_dir)  # the blob uploaded before is reused
    assert hub.repo_files("alice/m")["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()


def test_stale_parent_commit_is_refused(hub: HubServer) -> None:
    seed(hub, "alice/m")
    old = api(hub).model_info("alice/m").sha
    hub.add_files("alice/m", {"extra.txt": b"x"})
    with pytest.raises(HfHubHTTPError) as err:
        api(hub).upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id="alice/m", parent_commit=old)
    assert err.value.response.status_code == 412
    assert "y.txt" not in hub.repo_files("alice/m")


def test_pull_request(hub: HubServer, tmp_path: Path) -> None:
    seed(hub, "alice/m")
    before = hub.repo_files("alice/m")
    info = api(hub).upload_file(
        path_or_fileobj=b"new weights", path_in_repo="new.bin", repo_id="alice/m", create_pr=True
    )
    assert info.pr_url == f"{hub.url}/alice/m/discussions/1" and info.pr_num == 1
    assert hub.repo_files("alice/m") == before
    assert hub.repo_files("alice/m", revision="refs/pr/1")["new.bin"] == b"new weights"
    got = hf_hub_download("alice/m", "new.bin", revision="refs/pr/1", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(got).read_bytes() == b"new weights"
    assert api(hub).file_exists("alice/m", "new.bin", revision=info.oid)
    assert not api(hub).file_exists("alice/m", "new.bin")
    assert [c["branch"] for c in hub.commits("alice/m")][-1] == "refs/pr/1"


def test_read_only_token_and_foreign_repo_cannot_write(hub: HubServer, model_dir: Path) -> None:
    seed(hub, "alice/m")
    before_files, before_commits = hub.repo_files("alice/m"), hub.commits("alice/m")
    for token, repo_id in [(ALICE_RO, "alice/m"), (BOB, "alice/m")]:
        with pytest.raises(HfHubHTTPError) as err:
            api(hub, token).upload_folder(repo_id=repo_id, folder_path=model_dir)
        assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        api(hub, ALICE_RO).create_repo("alice/other")
    assert err.value.response.status_code == 403 and "read-only" in str(err.value)
    assert hub.repo_files("alice/m") == before_files and hub.commits("alice/m") == before_commits
    assert not api(hub).repo_exists("alice/other")


def test_request_log_redacts_tokens(hub: HubServer) -> None:
    seed(hub, "alice/m")
    api(hub).whoami()
    api(hub, BOB).model_info("alice/m")
    api(hub, "hf_unknown_token_123").model_info("alice/m")  # unknown tokens read as anonymous
    assert ALICE not in repr(hub.request_log) and BOB not in repr(hub.request_log)
    assert "hf_unknown_token_123" not in repr(hub.request_log)
    names = [(r.token_name, r.had_auth) for r in hub.requests_for("GET", "/api/")]
    assert names == [("alice", True), ("bob", True), (None, True)]
    assert hub.requests_for("GET", "/api/whoami-v2")[0].headers.get("authorization") == "Bearer ***"


def test_unknown_route_is_a_visible_404(hub: HubServer) -> None:
    from huggingface_hub.utils import get_session

    response = get_session().get(f"{hub.url}/api/models/alice/m/no-such-endpoint")
    assert response.status_code == 404 and "no route" in response.json()["error"]
    assert hub.request_log[-1].status == 404


def test_validate_yaml(hub: HubServer) -> None:
    client = api(hub)
    client.create_repo("alice/card")
    client.upload_file(path_or_fileobj=README, path_in_repo="README.md", repo_id="alice/card")
    with pytest.raises(ValueError, match="Invalid metadata"):
        client.upload_file(
            path_or_fileobj=b"---\nlicense: [unclosed\n---\n", path_in_repo="README.md", repo_id="alice/card"
        )


def test_transformers_autoconfig_through_hf_endpoint(hub: HubServer, tmp_path: Path) -> None:
    seed(hub, "acme/tiny-llama")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    code = (
        "from transformers import AutoConfig; c = AutoConfig.from_pretrained('acme/tiny-llama'); "
        "print(c.model_type, c.hidden_size)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["llama", "16"]
    # transformers pins the revision first (model_info), then reads config.json at that commit.
    heads = [r.path for r in hub.requests_for("HEAD", "/acme/tiny-llama/resolve/")]
    assert any(path.endswith("/config.json") for path in heads), heads
