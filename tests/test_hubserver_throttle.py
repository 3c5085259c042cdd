"""The local Hub's bandwidth limits and sparse uploads, which the Hub-to-Hub benchmark relies on."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download

from tests.conftest import ALICE
from tests.hubserver import HubServer
from tests.hubserver.throttle import TokenBucket, env_rate

MB = 1_000_000


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def _hub(root: Path, **limits: object) -> HubServer:
    hub = HubServer(root, **limits).start()  # type: ignore[arg-type]
    hub.add_user("alice", ALICE, write=True)
    return hub


def test_token_bucket_holds_the_rate_across_threads() -> None:
    bucket = TokenBucket(20 * MB)
    start = time.monotonic()
    threads = [threading.Thread(target=lambda: [bucket.take(MB // 4) for _ in range(8)]) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 6 MB through a 20 MB/s link, less the 1 MB burst: at least 0.25 s whatever the thread count.
    assert time.monotonic() - start >= 0.24


def test_env_rate_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBSERVER_DOWN_BPS", "100MB")
    assert env_rate("HUBSERVER_DOWN_BPS") == 100e6
    monkeypatch.setenv("HUBSERVER_DOWN_BPS", "5e7")
    assert env_rate("HUBSERVER_DOWN_BPS") == 5e7
    monkeypatch.setenv("HUBSERVER_DOWN_BPS", "0")
    assert env_rate("HUBSERVER_DOWN_BPS") is None


def test_downloads_and_uploads_are_throttled_and_sparse_uploads_keep_no_bytes(tmp_path: Path) -> None:
    data = os.urandom(4 * MB)
    (tmp_path / "w.safetensors").write_bytes(data)
    with _hub(tmp_path / "hub", down_bps=16 * MB, up_bps=8 * MB, sparse_uploads=True) as hub:
        hub.create_repo("alice/seed")
        hub.add_files("alice/seed", {"w.safetensors": data})
        start = time.monotonic()
        got = hf_hub_download("alice/seed", "w.safetensors", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c")
        down = time.monotonic() - start
        assert Path(got).read_bytes() == data and down >= 0.2  # 4 MB at 16 MB/s

        other = os.urandom(4 * MB)
        (tmp_path / "x.safetensors").write_bytes(other)
        api = HfApi(endpoint=hub.url, token=ALICE)
        api.create_repo("alice/out")
        start = time.monotonic()
        api.upload_file(path_or_fileobj=tmp_path / "x.safetensors", path_in_repo="x.safetensors", repo_id="alice/out")
        up = time.monotonic() - start
        assert up >= 0.4  # 4 MB at 8 MB/s
        blob = hub.state.blobs.path(hashlib.sha256(other).hexdigest())
        assert blob.stat().st_size == 4 * MB and blob.stat().st_blocks * 512 < MB  # committed, size only

        # The same bytes as a stored blob: the stored copy keeps its content.
        api.upload_file(path_or_fileobj=tmp_path / "w.safetensors", path_in_repo="w.safetensors", repo_id="alice/out")
        assert hub.repo_files("alice/seed")["w.safetensors"] == data
