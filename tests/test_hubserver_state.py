"""The local Hub's rules without sockets: its state, its operations, and its route table.

tests/test_hubserver.py drives the same server with the real client over HTTP; here each rule is
exercised directly, so a failure points at the rule and not at the wire.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from tests.hubserver import HubError, HubState, Request, find_route, respond
from tests.hubserver import operations as ops

ALICE, ALICE_RO, BOB = "tok-alice", "tok-alice-ro", "tok-bob"
WEIGHTS = bytes(range(256)) * 16


@pytest.fixture
def state(tmp_path: Path) -> HubState:
    hub = HubState(tmp_path / "hub", base_url="http://hub.test")
    hub.add_user("alice", ALICE, write=True, orgs=["acme"])
    hub.add_user("alice", ALICE_RO, write=False)
    hub.add_user("bob", BOB, write=True)
    hub.create_repo("alice/m")
    hub.add_files("alice/m", {"config.json": b"{}", "model.safetensors": WEIGHTS, "a/b/c.txt": b"c"})
    return hub


def snapshot(state: HubState, repo_id: str = "alice/m") -> tuple[dict, list]:
    return state.repo_files(repo_id), state.commits(repo_id)


def header(**value: str) -> dict:
    return {"key": "header", "value": {"summary": "msg", **value}}


def upload_lfs(state: HubState, data: bytes, token: str = ALICE) -> str:
    """The LFS protocol's three steps (batch, PUT, verify) at the state level; returns the oid."""
    oid = hashlib.sha256(data).hexdigest()
    body = {"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}
    answer = ops.lfs_batch(state, state.caller(token), ("model", "alice/m"), body)
    actions = answer["objects"][0].get("actions")
    if actions is not None:
        signature = actions["upload"]["href"].rsplit("/", 1)[1]
        ops.lfs_put(state, signature, iter([data[:100], data[100:]]))
        ops.lfs_verify(state, signature, {"oid": oid, "size": len(data)})
    return oid


class TestFiles:
    def test_lfs_and_regular_files_are_named_as_git_and_the_hub_name_them(self, state: HubState) -> None:
        files = state.repo("model", "alice/m").commits[state.resolve(state.repo("model", "alice/m"), "main")].files
        weights, config = files["model.safetensors"], files["config.json"]
        assert weights.lfs and weights.etag == hashlib.sha256(WEIGHTS).hexdigest()
        assert not config.lfs and config.etag == hashlib.sha1(b"blob 2\0{}").hexdigest()
        assert state.repo_files("alice/m")["model.safetensors"] == WEIGHTS

    def test_history_starts_with_gitattributes_and_records_each_change(self, state: HubState) -> None:
        commits = state.commits("alice/m")
        assert [c["message"] for c in commits] == ["initial commit", "seed"]
        assert commits[0]["files_changed"] == [".gitattributes"]
        assert commits[1]["parent"] == commits[0]["sha"]
        assert sorted(commits[1]["files_changed"]) == ["a/b/c.txt", "config.json", "model.safetensors"]

    @pytest.mark.parametrize("path", ["", "/abs", "a/../b", "a//b", "./a"])
    def test_bad_paths_are_refused(self, state: HubState, path: str) -> None:
        with pytest.raises(HubError) as err:
            state.add_files("alice/m", {path: b"x"})
        assert err.value.status == 400


class TestAccess:
    def test_private_repo_is_hidden_until_granted(self, state: HubState) -> None:
        state.create_repo("acme/secret", private=True)
        for caller in (None, state.caller(BOB), state.caller("unknown-token")):
            with pytest.raises(HubError) as err:
                ops.repo_info(state, caller, ("model", "acme/secret"), "main")
            assert (err.value.status, err.value.code) == (404, "RepoNotFound")
        assert ops.repo_info(state, state.caller(ALICE_RO), ("model", "acme/secret"), "main")["private"]  # org
        state.grant("acme/secret", BOB)
        assert ops.repo_info(state, state.caller(BOB), ("model", "acme/secret"), "main")["id"] == "acme/secret"

    def test_gated_repo_shows_metadata_but_not_files(self, state: HubState) -> None:
        state.create_repo("acme/gated", gated=True)
        state.add_files("acme/gated", {"config.json": b"{}"})
        assert ops.repo_info(state, None, ("model", "acme/gated"), "main")["gated"] == "manual"
        with pytest.raises(HubError) as err:
            ops.resolve_file(state, state.caller(BOB), ("model", "acme/gated"), "main", "config.json")
        assert (err.value.status, err.value.code) == (403, "GatedRepo")
        state.grant("acme/gated", BOB)
        assert ops.resolve_file(state, state.caller(BOB), ("model", "acme/gated"), "main", "config.json").entry

    @pytest.mark.parametrize(
        "token, words",
        [(None, "authenticated"), (ALICE_RO, "read-only"), (BOB, "namespace alice")],
    )
    def test_only_the_owner_with_a_write_token_commits(self, state: HubState, token: str | None, words: str) -> None:
        before = snapshot(state)
        lines = [header(), {"key": "file", "value": {"path": "x.txt", "content": base64.b64encode(b"x").decode()}}]
        with pytest.raises(HubError, match=words) as err:
            ops.commit(state, state.caller(token), ("model", "alice/m"), "main", lines, create_pr=False)
        assert err.value.status == 403
        assert snapshot(state) == before


class TestCommits:
    def test_lfs_upload_then_commit_and_a_second_upload_is_skipped(self, state: HubState) -> None:
        data = b"new weights \0" * 100
        oid = upload_lfs(state, data)
        lines = [header(), {"key": "lfsFile", "value": {"path": "new.safetensors", "algo": "sha256", "oid": oid}}]
        answer = ops.commit(state, state.caller(ALICE), ("model", "alice/m"), "main", lines, create_pr=False)
        assert answer["commitUrl"] == f"http://hub.test/alice/m/commit/{answer['commitOid']}"
        assert state.repo_files("alice/m")["new.safetensors"] == data
        again = ops.lfs_batch(
            state,
            state.caller(ALICE),
            ("model", "alice/m"),
            {"operation": "upload", "objects": [{"oid": oid, "size": 1}]},
        )
        assert "actions" not in again["objects"][0]

    def test_pull_request_leaves_main_alone(self, state: HubState) -> None:
        main = state.repo_files("alice/m")
        lines = [header(), {"key": "deletedFile", "value": {"path": "config.json"}}]
        answer = ops.commit(state, state.caller(ALICE), ("model", "alice/m"), "main", lines, create_pr=True)
        assert answer["pullRequestUrl"] == "http://hub.test/alice/m/discussions/1"
        assert state.repo_files("alice/m") == main
        assert "config.json" not in state.repo_files("alice/m", "refs/pr/1")

    def test_deleted_folder_takes_everything_inside(self, state: HubState) -> None:
        lines = [header(), {"key": "deletedFolder", "value": {"path": "a/"}}]
        ops.commit(state, state.caller(ALICE), ("model", "alice/m"), "main", lines, create_pr=False)
        assert sorted(state.repo_files("alice/m")) == [".gitattributes", "config.json", "model.safetensors"]
        assert state.commits("alice/m")[-1]["files_deleted"] == ["a/b/c.txt"]

    @pytest.mark.parametrize(
        "lines, status",
        [
            ([header(parentCommit="0" * 40)], 412),
            ([header(), {"key": "deletedFile", "value": {"path": "missing.txt"}}], 404),
            ([header(), {"key": "deletedFolder", "value": {"path": "nope/"}}], 404),
            ([header(), {"key": "lfsFile", "value": {"path": "w.bin", "oid": "f" * 64}}], 400),
            ([header(), {"key": "rename", "value": {"path": "x"}}], 400),
            ([{"key": "file", "value": {"path": "x"}}], 400),
        ],
        ids=["stale-parent", "missing-file", "missing-folder", "unknown-lfs-object", "unknown-op", "no-header"],
    )
    def test_refused_commit_changes_nothing(self, state: HubState, lines: list[dict], status: int) -> None:
        before = snapshot(state)
        with pytest.raises(HubError) as err:
            ops.commit(state, state.caller(ALICE), ("model", "alice/m"), "main", lines, create_pr=False)
        assert err.value.status == status
        assert snapshot(state) == before


class TestInjectedFailures:
    def test_failing_commits(self, state: HubState) -> None:
        before = snapshot(state)
        state.fail_commits(True)
        with pytest.raises(HubError, match="injected failure"):
            ops.commit(state, state.caller(ALICE), ("model", "alice/m"), "main", [header()], create_pr=False)
        assert snapshot(state) == before
        state.fail_commits(False)
        ops.commit(state, state.caller(ALICE), ("model", "alice/m"), "main", [header()], create_pr=False)
        assert len(state.commits("alice/m")) == len(before[1]) + 1

    def test_upload_limit_stops_the_object_from_being_stored(self, state: HubState) -> None:
        data = b"\0" * 5000
        state.fail_uploads_after(1000)
        with pytest.raises(HubError, match="injected failure") as err:
            upload_lfs(state, data)
        assert err.value.status == 403
        assert not state.blobs.path(hashlib.sha256(data).hexdigest()).exists()
        state.fail_uploads_after(None)
        assert state.blobs.path(upload_lfs(state, data)).exists()

    def test_upload_with_other_content_than_announced_is_refused(self, state: HubState) -> None:
        oid = hashlib.sha256(b"announced").hexdigest()
        answer = ops.lfs_batch(
            state,
            state.caller(ALICE),
            ("model", "alice/m"),
            {"operation": "upload", "objects": [{"oid": oid, "size": 9}]},
        )
        signature = answer["objects"][0]["actions"]["upload"]["href"].rsplit("/", 1)[1]
        with pytest.raises(HubError, match="does not match"):
            ops.lfs_put(state, signature, iter([b"different"]))
        with pytest.raises(HubError, match="was not uploaded"):
            ops.lfs_verify(state, signature, {"oid": oid, "size": 9})
        with pytest.raises(HubError, match="expired"):
            ops.lfs_put(state, "no-such-signature", iter([b"x"]))


class TestRoutes:
    @pytest.mark.parametrize(
        "method, path, handler, params",
        [
            ("GET", "/api/whoami-v2", "_whoami", {}),
            ("GET", "/api/models/alice/m", "_info", {"type": "models", "ns": "alice", "name": "m"}),
            ("GET", "/api/models/alice/m/revision/refs%2Fpr%2F1", "_info", {"rev": "refs%2Fpr%2F1"}),
            ("GET", "/api/datasets/alice/d/tree/main/a/b", "_tree", {"type": "datasets", "rev": "main", "path": "a/b"}),
            ("POST", "/api/models/alice/m/preupload/main", "_preupload", {"rev": "main"}),
            ("POST", "/api/models/alice/m/commit/main", "_commit", {"rev": "main"}),
            ("POST", "/alice/m.git/info/lfs/objects/batch", "_lfs_batch", {"ns": "alice", "name": "m"}),
            ("PUT", "/lfs-upload/sig", "_lfs_put", {"signature": "sig"}),
            ("POST", "/lfs-verify/sig", "_lfs_verify", {"signature": "sig"}),
            ("HEAD", "/alice/m/resolve/main/a/b.json", "_resolve", {"rev": "main", "path": "a/b.json"}),
            ("GET", "/alice/m/resolve/refs/pr/1/w.bin", "_resolve", {"rev": "refs/pr/1", "path": "w.bin"}),
            ("GET", "/spaces/alice/s/resolve/main/app.py", "_resolve", {"type": "spaces", "ns": "alice"}),
        ],
    )
    def test_table(self, method: str, path: str, handler: str, params: dict) -> None:
        found = find_route(method, path)
        assert found is not None
        route, got = found
        assert route.handler.__name__ == handler
        assert params.items() <= got.items()

    @pytest.mark.parametrize(
        "method, path",
        [
            ("POST", "/api/whoami-v2"),
            ("GET", "/api/models/alice/m/no-such-endpoint"),
            ("PUT", "/alice/m/resolve/main/x"),
            ("GET", "/api/x/resolve/main/file"),
            ("GET", "/api/models/alice/m/revision/"),
        ],
    )
    def test_unknown_routes_are_a_visible_404(self, state: HubState, method: str, path: str) -> None:
        assert find_route(method, path) is None
        response = respond(state, Request(method, path, {}, {}, None, None), None)
        assert response.status == 404 and b"no route" in response.body

    def test_resolve_answers_ranges_and_hub_headers(self, state: HubState) -> None:
        path = "/alice/m/resolve/main/model.safetensors"
        req = Request("GET", path, {}, {"range": "bytes=10-19"}, None, None)
        response = respond(state, req, find_route("GET", path))
        assert response.status == 206 and response.file_range == (10, 20)
        assert response.headers["X-Linked-Size"] == str(len(WEIGHTS)) and len(response.headers["X-Repo-Commit"]) == 40
        missing = "/alice/m/resolve/main/nope.json"
        response = respond(state, Request("HEAD", missing, {}, {}, None, None), find_route("HEAD", missing))
        assert response.status == 404 and response.headers["X-Error-Code"] == "EntryNotFound"
        assert response.headers["X-Repo-Commit"] == state.repo("model", "alice/m").refs["main"]

    def test_server_bug_is_a_loud_500(self, state: HubState) -> None:
        path = "/api/models/alice/m/commit/main"
        req = Request("POST", path, {}, {}, ALICE, state.caller(ALICE), body=b"{not json")
        response = respond(state, req, find_route("POST", path))
        assert response.status == 500 and b"internal error" in response.body
