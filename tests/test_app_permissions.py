"""The app's handlers with a Space login (gr.OAuthToken and its scopes): the push mode's permission is
checked before the merge starts, and with the permission the merge and the pull request go through."""

from __future__ import annotations

import time

import app
from tests.hubserver import HubServer
from tests.test_app import demo_present, hub, lms_dirs, merge, push, tempdir  # noqa: F401 - fixtures and helpers

OAUTH = "hf_oauth_app_alice_0123456789"
SIGN_IN = "openid profile read-repos gated-repos contribute-repos"  # this Space's scopes, less write-discussions


def login(scope: str) -> app.gr.OAuthToken:
    return app.gr.OAuthToken(token=OAUTH, scope=scope, expires_at=int(time.time()) + 3600)


def test_a_login_without_write_discussions_is_refused_before_the_merge(tempdir, hub: HubServer) -> None:  # noqa: F811
    hub.state.add_oauth_token("alice", OAUTH, SIGN_IN)
    if ("model", "alice/pr-target") not in hub.state.repos:
        hub.create_repo("alice/pr-target")
    hub.clear_log()
    out = merge("alice/tiny-lora", repo_name="alice/pr-target", push_mode="Open a pull request", oauth=login(SIGN_IN))
    error = out["error"]["value"]
    assert out["state"] is None and "write-discussions" in error and "Sign in again" in error, error
    assert "discussion.write on alice/pr-target" in error
    assert [r.path for r in hub.request_log] == ["/api/whoami-v2"]  # nothing downloaded, nothing written
    assert lms_dirs(tempdir) == []

    # With the scope (signed in again), the same request merges, and Push opens the pull request.
    full = login(f"{SIGN_IN} write-discussions")
    hub.state.add_oauth_token("alice", OAUTH, full.scope)
    out = merge("alice/tiny-lora", repo_name="alice/pr-target", push_mode="Open a pull request", oauth=full)
    assert isinstance(out["state"], app.MergeResult), out["error"]
    pr = push(out["state"], "alice/pr-target", mode="Open a pull request", oauth=full)
    assert pr["error"]["visible"] is False, pr["error"]
    assert "model.safetensors" in hub.repo_files("alice/pr-target", revision="refs/pr/1")
    app.discard(out["state"])
