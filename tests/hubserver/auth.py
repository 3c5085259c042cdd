"""Who may do what with which token: classic read/write tokens, OAuth tokens with scopes, fine-grained tokens.

How the Hub shows a token on ``whoami-v2`` (``auth``), modelled here:

* classic: ``{"type": "access_token", "accessToken": {"displayName", "role": "read" | "write", "createdAt"}}``;
* fine-grained: ``accessToken.role == "fineGrained"`` and ``accessToken.fineGrained == {"canReadGatedRepos",
  "global": [...], "scoped": [{"entity": {"_id", "type", "name"}, "permissions": [...]}]}``, an entity being
  the user, an organisation or one repository (type ``model``/``dataset``/``space``, name ``owner/name``);
* OAuth (an app's token acting as the user): ``{"type": "app_token_as_user", "expiresAt"}``, with no
  ``accessToken`` and no scopes: the app learns its scopes from the token response.

OAuth scopes as the Hub documents them: ``contribute-repos`` creates repos and writes those this app
created; ``write-repos``/``manage-repos`` write every repo of the user; ``write-discussions`` opens pull
requests; ``read-repos`` reads private repos. Refusals use the Hub's own sentences.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .state import HubError, TokenInfo

if TYPE_CHECKING:
    from .state import HubState, Repo

CLASSIC, OAUTH, FINE_GRAINED = "classic", "oauth", "fineGrained"
NO_PERMISSION = "You have read access but not the required permissions for this operation."
_WRITE_SCOPES = {"write-repos", "manage-repos"}
_READ_SCOPES = {"read-repos", "write-repos", "manage-repos"}


def _permissions(caller: TokenInfo, names: set[str]) -> set[str]:
    granted = set(caller.global_permissions)
    for name, permissions in caller.scoped:
        if name in names:
            granted |= permissions
    return granted


def _created_here(caller: TokenInfo, repo: Repo) -> bool:
    return caller.app is not None and repo.created_by_app == caller.app


def may_read_private(caller: TokenInfo, repo: Repo) -> bool:
    """The token (of a user who may see the repo) reaches its private content."""
    if caller.kind == OAUTH:
        return bool(caller.scopes & _READ_SCOPES) or _created_here(caller, repo)
    if caller.kind == FINE_GRAINED:
        names = {repo.namespace, repo.repo_id}
        return bool(_permissions(caller, names) & {"repo.content.read", "repo.write"})
    return True


def require_create(state: HubState, caller: TokenInfo | None, namespace: str, repo_type: str) -> TokenInfo:
    if caller is None:
        raise HubError(403, "You must be authenticated with a write token to create a repo.")
    if caller.kind == CLASSIC and not caller.write:
        raise HubError(403, "This token is read-only: it cannot create repos. Use a token with write access.")
    if caller.kind == OAUTH:
        allowed = bool(caller.scopes & {"contribute-repos", "manage-repos"})
    elif caller.kind == FINE_GRAINED:
        allowed = "repo.write" in _permissions(caller, {namespace})
    else:
        allowed = True
    if not allowed or not state.owns(caller.user, namespace):
        raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
    return caller


def may_write(state: HubState, caller: TokenInfo, repo: Repo) -> bool:
    if not state.owns(caller.user, repo.namespace):
        return False
    if caller.kind == OAUTH:
        contributed = "contribute-repos" in caller.scopes and _created_here(caller, repo)
        return bool(caller.scopes & _WRITE_SCOPES) or contributed
    if caller.kind == FINE_GRAINED:
        return "repo.write" in _permissions(caller, {repo.namespace, repo.repo_id})
    return caller.write


def may_open_pr(caller: TokenInfo, repo: Repo) -> bool:
    """Anyone who sees a repo may propose a change to it, with a token allowed to open discussions."""
    if caller.kind == OAUTH:
        return "write-discussions" in caller.scopes
    if caller.kind == FINE_GRAINED:
        return "discussion.write" in _permissions(caller, {repo.namespace, repo.repo_id})
    return caller.write


def require_write(
    state: HubState, caller: TokenInfo | None, repo: Repo, what: str, *, write: bool = True, pr: bool = False
) -> TokenInfo:
    """Write access to ``repo`` (``write``) and/or the right to open a pull request on it (``pr``)."""
    if caller is None:
        raise HubError(403, f"You must be authenticated with a write token to {what}.")
    if (write and may_write(state, caller, repo)) or (pr and may_open_pr(caller, repo)):
        return caller
    if caller.kind == CLASSIC and not caller.write:
        raise HubError(403, f"This token is read-only: it cannot {what}. Use a token with write access.")
    if caller.kind == CLASSIC:
        raise HubError(403, f"You don't have the rights to {what} (namespace {repo.namespace}).")
    raise HubError(403, NO_PERMISSION)


def whoami_auth(state: HubState, caller: TokenInfo) -> dict:
    """The ``auth`` block of whoami-v2 for this token."""
    if caller.kind == OAUTH:
        return {"type": "app_token_as_user", "expiresAt": "2099-01-01T00:00:00.000Z"}
    token: dict = {"displayName": f"{caller.user}-token", "createdAt": "2026-01-01T00:00:00.000Z"}
    if caller.kind == FINE_GRAINED:
        token["role"] = "fineGrained"
        token["fineGrained"] = {
            "canReadGatedRepos": True,
            "global": sorted(caller.global_permissions),
            "scoped": [
                {"entity": _entity(state, name), "permissions": sorted(permissions)}
                for name, permissions in caller.scoped
            ],
        }
    else:
        token["role"] = "write" if caller.write else "read"
    return {"type": "access_token", "accessToken": token}


def _entity(state: HubState, name: str) -> dict:
    kind = "model" if "/" in name else "user" if name in state.users else "org"
    return {"_id": hashlib.sha1(name.encode()).hexdigest()[:24], "type": kind, "name": name}
