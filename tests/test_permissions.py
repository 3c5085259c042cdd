"""Permissions per push mode: the preflight's answer for OAuth-scoped and fine-grained tokens, each mode with
and without its permission, agrees with what the (local) Hub then lets the token do; the refusal names the
permission and how to get it; the CLI shows the same sentence before any download."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from merge_core import cli
from merge_core.errors import PushError
from merge_core.folder_push import push_folder_with_progress
from merge_core.hub import HubClient, PushMode
from merge_core.permissions import permissions_table
from tests.conftest import ALICE
from tests.hubserver import HubServer

OAUTH, FINE = "hf_oauth_alice_0123456789", "hf_fine_alice_0123456789"
SIGN_IN = "openid profile read-repos gated-repos"  # what every login below has, plus the scopes under test


def _oauth(hub: HubServer, scopes: str) -> HubClient:
    hub.state.add_oauth_token("alice", OAUTH, f"{SIGN_IN} {scopes}")
    return HubClient(OAUTH, hub.url, oauth_scope=f"{SIGN_IN} {scopes}")


def _fine(hub: HubServer, **permissions: object) -> HubClient:
    hub.state.add_fine_grained_token("alice", FINE, **permissions)  # type: ignore[arg-type]
    return HubClient(FINE, hub.url)


def _hub_allows(client: HubClient, repo_id: str, mode: PushMode) -> bool:
    """What the Hub lets this token do in ``mode``: create the repo, commit to main, or open a pull request."""
    api = client.api
    try:
        if mode is PushMode.NEW:
            api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=b"w", path_in_repo="w.bin", repo_id=repo_id, create_pr=mode is PushMode.PR)
    except HfHubHTTPError as exc:
        assert exc.response.status_code == 403, exc
        return False
    return True


def _preflight_allows(client: HubClient, repo_id: str, mode: PushMode) -> str | None:
    """None when the preflight passes, else its sentence."""
    try:
        client.preflight_push(repo_id, mode)
    except PushError as exc:
        return str(exc)
    return None


@pytest.fixture
def hub(hub_server: HubServer) -> HubServer:
    hub_server.add_user("alice", ALICE, orgs=("acme",))
    hub_server.create_repo("alice/target")  # made on the website, not by this app
    return hub_server


CASES = [
    # (token maker, kwargs, mode, allowed, words the refusal must contain)
    ("oauth", {"scopes": "contribute-repos"}, PushMode.NEW, True, ()),
    ("oauth", {"scopes": "write-discussions"}, PushMode.NEW, False, ("contribute-repos", "Sign in again")),
    ("oauth", {"scopes": "write-repos"}, PushMode.UPDATE, True, ()),
    ("oauth", {"scopes": "contribute-repos write-discussions"}, PushMode.UPDATE, False, ("write-repos", "repo.write")),
    ("oauth", {"scopes": "write-discussions"}, PushMode.PR, True, ()),
    ("oauth", {"scopes": "contribute-repos"}, PushMode.PR, False, ("write-discussions", "Sign in again")),
    ("fine", {"scoped": {"alice": ("repo.write",)}}, PushMode.NEW, True, ()),
    ("fine", {"scoped": {"alice/target": ("repo.write",)}}, PushMode.NEW, False, ("repo.write on alice",)),
    ("fine", {"scoped": {"alice/target": ("repo.content.read", "repo.write")}}, PushMode.UPDATE, True, ()),
    ("fine", {"global_permissions": ("discussion.write",)}, PushMode.UPDATE, False, ("repo.write on alice/target",)),
    ("fine", {"global_permissions": ("discussion.write",)}, PushMode.PR, True, ()),
    ("fine", {"scoped": {"alice": ("repo.write",)}}, PushMode.PR, False, ("discussion.write on alice/target",)),
    ("fine", {"scoped": {"acme": ("repo.write",)}}, PushMode.NEW, True, ()),
    ("fine", {"scoped": {"alice": ("repo.write",)}}, PushMode.NEW, False, ("repo.write on acme",)),
]
ORG_CASES = 2  # the last CASES create in the organisation acme


@pytest.mark.parametrize(("case", "kind", "grant", "mode", "allowed", "words"), [(i, *c) for i, c in enumerate(CASES)])
def test_preflight_agrees_with_the_hub(hub: HubServer, case, kind, grant, mode, allowed, words) -> None:
    client = _oauth(hub, **grant) if kind == "oauth" else _fine(hub, **grant)
    owner = "acme" if case >= len(CASES) - ORG_CASES else "alice"
    repo_id = f"{owner}/fresh" if mode is PushMode.NEW else "alice/target"
    refusal = _preflight_allows(client, repo_id, mode)
    assert (refusal is None) is allowed, refusal
    for word in words:
        assert word in refusal, refusal  # type: ignore[operator]
    before = hub.commits("alice/target")
    assert _hub_allows(client, repo_id, mode) is allowed  # the preflight said what the Hub then does
    if not allowed:
        assert hub.commits("alice/target") == before
        assert mode is not PushMode.NEW or repo_id not in {key[1] for key in hub.state.repos}


def test_contribute_repos_updates_what_this_app_created(hub: HubServer) -> None:
    """contribute-repos writes the repos this app created and no other; only the Hub knows which, and is asked."""
    client = _oauth(hub, "contribute-repos")
    client.api.create_repo("alice/made-here")
    assert _preflight_allows(client, "alice/made-here", PushMode.UPDATE) is None
    assert _hub_allows(client, "alice/made-here", PushMode.UPDATE)
    refusal = _preflight_allows(client, "alice/target", PushMode.UPDATE)
    assert refusal is not None and "write-repos" in refusal and "Open a pull request" in refusal
    assert not _hub_allows(client, "alice/target", PushMode.UPDATE)


def test_a_refusal_nothing_predicted_still_names_the_permission(hub: HubServer, tmp_path: Path) -> None:
    """An OAuth token pasted without its scopes: whoami cannot tell, the Hub refuses, the sentence names the scope."""
    hub.state.add_oauth_token("alice", OAUTH, f"{SIGN_IN} contribute-repos")
    client = HubClient(OAUTH, hub.url)  # no oauth_scope: the preflight cannot know
    target = client.preflight_push("alice/target", PushMode.PR)
    (tmp_path / "w.bin").write_bytes(b"w")
    with pytest.raises(PushError) as err:
        push_folder_with_progress(client, target, tmp_path, message="m", description="d")
    assert "write-discussions" in str(err.value) and "discussion.write on alice/target" in str(err.value)
    assert "alice/target is unchanged" in str(err.value) and OAUTH not in str(err.value)
    assert [c["branch"] for c in hub.commits("alice/target")] == ["main"]


def test_whoami_shows_each_token_kind_as_the_hub_does(hub: HubServer) -> None:
    _oauth(hub, "contribute-repos")
    _fine(hub, global_permissions=("discussion.write",), scoped={"alice/target": ("repo.write",)})
    oauth = HfApi(endpoint=hub.url, token=OAUTH).whoami()["auth"]
    assert oauth["type"] == "app_token_as_user" and "accessToken" not in oauth  # no scopes: they come with the login
    fine = HfApi(endpoint=hub.url, token=FINE).whoami()["auth"]["accessToken"]
    assert fine["role"] == "fineGrained" and fine["fineGrained"]["global"] == ["discussion.write"]
    assert fine["fineGrained"]["scoped"][0]["entity"]["name"] == "alice/target"
    assert HfApi(endpoint=hub.url, token=ALICE).whoami()["auth"]["accessToken"]["role"] == "write"


def test_an_oauth_login_without_read_repos_does_not_see_private_repos(hub: HubServer) -> None:
    hub.create_repo("alice/secret", private=True)
    hub.state.add_oauth_token("alice", OAUTH, "openid profile contribute-repos")
    assert not HfApi(endpoint=hub.url, token=OAUTH).repo_exists("alice/secret")
    hub.state.add_oauth_token("alice", OAUTH, "openid profile read-repos")
    assert HfApi(endpoint=hub.url, token=OAUTH).repo_exists("alice/secret")


def test_cli_refuses_a_pull_request_without_discussion_write_before_any_download(
    hub: HubServer, tmp_path: Path, capsys, monkeypatch
) -> None:
    _fine(hub, scoped={"alice": ("repo.write",)})
    monkeypatch.setenv("HF_TOKEN", FINE)
    hub.clear_log()
    args = ["acme/base", "alice/lora", str(tmp_path / "out"), "--quiet", "--endpoint", hub.url]
    assert cli.main([*args, "--push", "alice/target", "--push-mode", "pr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "discussion.write on alice/target" in err and "Traceback" not in err
    assert err.count("\n") == 1 and FINE not in err
    assert [r.path for r in hub.request_log if "/resolve/" in r.path or "/api/models/acme" in r.path] == []
    assert not (tmp_path / "out").exists()


def test_merge_checks_only_a_target_the_user_chose(hub: HubServer) -> None:
    """Before a merge: no target, or the name a previous merge suggested in mode "new", asks nothing;
    a typed target asks whoami only, never whether the repo exists (a re-merge after a push passes)."""
    from types import SimpleNamespace

    from merge_core.jobs import check_push_permission
    from merge_core.pipeline import MergeForm

    hub.state.add_oauth_token("alice", OAUTH, SIGN_IN)
    previous = SimpleNamespace(inputs=SimpleNamespace(suggested_name="lora-merged"))
    hub.clear_log()
    for form in [MergeForm(push_mode="Open a pull request"), MergeForm(repo_name="alice/lora-merged", state=previous)]:
        check_push_permission(form, OAUTH, oauth_scope=SIGN_IN, endpoint=hub.url)
    assert hub.request_log == []
    scope = f"{SIGN_IN} contribute-repos"
    check_push_permission(MergeForm(repo_name="alice/target"), OAUTH, oauth_scope=scope, endpoint=hub.url)
    with pytest.raises(PushError, match="write-discussions"):
        form = MergeForm(repo_name="alice/lora-merged", push_mode="Open a pull request", state=previous)
        check_push_permission(form, OAUTH, oauth_scope=f"{SIGN_IN} contribute-repos", endpoint=hub.url)
    assert [r.path for r in hub.request_log] == ["/api/whoami-v2"] * 2


def test_readme_has_the_permissions_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert permissions_table() in readme, "paste merge_core.permissions.permissions_table() into README"
    front = readme.split("---")[1]
    for scope in ("contribute-repos", "write-discussions", "read-repos", "gated-repos"):
        assert f"- {scope}\n" in front
    assert "write-repos" not in front and "manage-repos" not in front
