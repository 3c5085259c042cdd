"""Which Hub permission each push mode needs, whether a token has it, and the sentence when it does not.

What a token may do is read from two places. ``whoami-v2`` shows a classic token's role (``read`` or
``write``) and a fine-grained token's permissions (``auth.accessToken.role == "fineGrained"``, then
``fineGrained.global`` and ``fineGrained.scoped[].entity.name`` / ``.permissions``, per user,
organisation or repository). A Space login is an OAuth token: whoami-v2 only says
``{"type": "app_token_as_user"}``, so its scopes come with the token itself (gradio's
``OAuthToken.scope``) and are passed in. Without either, nothing is refused here and the Hub decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import PushError
from .hub import PushMode

# What the Space asks for at sign-in (README front matter, hf_oauth_scopes). write-repos is not among
# them: it opens every repository of the user to this app, where these three reach only what it needs.
SPACE_SCOPES = ("read-repos", "gated-repos", "contribute-repos", "write-discussions")


@dataclass(frozen=True)
class Need:
    """What one push mode needs: an OAuth scope (any of ``scopes``) or a fine-grained permission."""

    action: str  # what the user asked for, as the sentence names it
    scopes: tuple[str, ...]  # the first is the one to ask for
    permission: str  # fine-grained
    on_repo: bool  # the permission may sit on the repository itself (else on its owner)
    at_sign_in: str  # what the Space's sign-in gives, for the README table


NEEDS: dict[PushMode, Need] = {
    PushMode.NEW: Need(
        "Creating a new repository",
        ("contribute-repos", "manage-repos"),
        "repo.write",
        False,
        "yes (`contribute-repos`)",
    ),
    PushMode.UPDATE: Need(
        "Updating an existing repository",
        ("write-repos", "manage-repos"),
        "repo.write",
        True,
        "only for repos this Space created (`contribute-repos`); others need a pasted token",
    ),
    PushMode.PR: Need(
        "Opening a pull request",
        ("write-discussions",),
        "discussion.write",
        True,
        "yes (`write-discussions`; `read-repos` for private repos)",
    ),
}


class Verdict(Enum):
    ALLOWED = "allowed"
    MISSING = "missing"
    UNKNOWN = "unknown"  # nothing says; the Hub decides (an OAuth token of unknown scope)
    ASK_HUB = "ask the hub"  # contribute-repos: allowed only on repos this app created, which only the Hub knows


@dataclass(frozen=True)
class TokenAccess:
    """What one token may do, as far as whoami-v2 (and the login's scopes) tell."""

    kind: str  # "read", "write", "fineGrained", "oauth" or "unknown"
    scopes: frozenset[str] = frozenset()  # OAuth
    global_permissions: frozenset[str] = frozenset()  # fine-grained, everywhere
    scoped: tuple[tuple[str, frozenset[str]], ...] = ()  # fine-grained: (user, org or repo name, permissions)

    @classmethod
    def from_whoami(cls, me: dict[str, Any], oauth_scope: str | None = None) -> TokenAccess:
        if oauth_scope is not None:
            return cls("oauth", scopes=frozenset(oauth_scope.split()))
        token = (me.get("auth") or {}).get("accessToken") or {}
        role = token.get("role")
        if role == "fineGrained":
            grained = token.get("fineGrained") or {}
            scoped = tuple(
                (str((item.get("entity") or {}).get("name") or ""), frozenset(item.get("permissions") or ()))
                for item in grained.get("scoped") or []
                if isinstance(item, dict)
            )
            return cls("fineGrained", global_permissions=frozenset(grained.get("global") or ()), scoped=scoped)
        if role in ("read", "write", "admin"):
            return cls("read" if role == "read" else "write")
        return cls("unknown")

    def permissions_on(self, names: set[str]) -> frozenset[str]:
        granted = set(self.global_permissions)
        for name, permissions in self.scoped:
            if name in names:
                granted |= permissions
        return frozenset(granted)


def verdict(access: TokenAccess, mode: PushMode, repo_id: str) -> Verdict:
    """Whether ``access`` may push ``repo_id`` in ``mode`` (namespace membership is checked elsewhere)."""
    need = NEEDS[mode]
    if access.kind == "unknown":
        return Verdict.UNKNOWN
    if access.kind in ("read", "write"):
        return Verdict.ALLOWED if access.kind == "write" else Verdict.MISSING
    if access.kind == "oauth":
        if access.scopes & set(need.scopes):
            return Verdict.ALLOWED
        # contribute-repos also writes the repos this app created; no token info says which those are.
        return Verdict.ASK_HUB if mode is PushMode.UPDATE and "contribute-repos" in access.scopes else Verdict.MISSING
    owner = repo_id.partition("/")[0]
    names = {owner, repo_id} if need.on_repo else {owner}
    return Verdict.ALLOWED if need.permission in access.permissions_on(names) else Verdict.MISSING


def require_permission(
    me: dict[str, Any],
    mode: PushMode,
    repo_id: str,
    *,
    oauth_scope: str | None,
    endpoint: str,
    ask_hub: Callable[[str], bool],
) -> None:
    """Refuse (PushError, one sentence) a token without the mode's permission or the target's namespace.
    ``me`` is whoami-v2's answer; ``ask_hub(repo_id)`` is True when the Hub refuses writes to it."""
    access = TokenAccess.from_whoami(me, oauth_scope)
    found = verdict(access, mode, repo_id)
    if found is Verdict.ASK_HUB and ask_hub(repo_id):
        found = Verdict.MISSING
    if found is Verdict.MISSING:
        raise PushError(refusal(access, mode, repo_id, endpoint=endpoint))
    writable, owner = writable_namespaces(me), repo_id.partition("/")[0]
    if mode is not PushMode.PR and owner not in writable:
        raise PushError(
            f"Your token cannot write to the namespace {owner!r} (it can write to: "
            f"{', '.join(sorted(writable)) or 'none'}); push to one of those or open a pull request."
        )


def writable_namespaces(me: dict[str, Any]) -> set[str]:
    """The account's own name and the organisations where its role allows writing."""
    names = {str(me.get("name") or "")}
    for org in me.get("orgs") or []:
        if isinstance(org, dict) and org.get("name") and org.get("roleInOrg") != "read":
            names.add(str(org["name"]))
    return names - {""}


def refusal(access: TokenAccess, mode: PushMode, repo_id: str, *, endpoint: str) -> str:
    """The sentence for a missing permission: which one this mode needs, and how to get it."""
    need, target = NEEDS[mode], repo_id if NEEDS[mode].on_repo else repo_id.partition("/")[0]
    paste = f"paste a fine-grained token with {need.permission} on {target} ({endpoint}/settings/tokens)"
    if access.kind == "read":
        return f"Your token is read-only. {need.action} needs a write token; create one or {paste}."
    if access.kind == "fineGrained":
        return (
            f"{need.action} needs the permission {need.permission} on {target}, which this fine-grained token "
            f"lacks. Add it to the token or {paste}."
        )
    scope = need.scopes[0]
    if scope in SPACE_SCOPES:
        return (
            f"{need.action} needs the {scope} permission, which this login lacks. Sign in again and allow "
            f"{scope}, or {paste}."
        )
    return (
        f"{need.action} needs the {scope} permission on {repo_id}: this Space does not ask for {scope} at "
        f"sign-in (its contribute-repos covers only the repositories it created). {paste[0].upper()}{paste[1:]}, "
        "or choose 'Open a pull request'."
    )


def hub_refused(mode: PushMode, repo_id: str, *, endpoint: str) -> str:
    """The Hub refused a push the token info could not predict (an OAuth token pasted without its scopes)."""
    need = NEEDS[mode]
    target = repo_id if need.on_repo else repo_id.partition("/")[0]
    return (
        f"the Hub refused it: {need.action[0].lower()}{need.action[1:]} needs the {need.scopes[0]} permission "
        f"(Space sign-in) or a token with {need.permission} on {target} ({endpoint}/settings/tokens)"
    )


def permissions_table() -> str:
    """The README's table: one row per push mode, from NEEDS (tests/test_docs.py keeps them equal)."""
    from .frontend import PUSH_MODE_LABELS

    labels = {PushMode(value): label for label, value in PUSH_MODE_LABELS.items()}
    rows = [
        "| Push mode | OAuth scope | Fine-grained token permission | Space sign-in covers it |",
        "|---|---|---|---|",
    ]
    for mode, need in NEEDS.items():
        scopes = " or ".join(f"`{s}`" for s in need.scopes)
        where = "the repository or its owner" if need.on_repo else "the owner (you or the organisation)"
        rows.append(f"| {labels[mode]} | {scopes} | `{need.permission}` on {where} | {need.at_sign_in} |")
    return "\n".join(rows)
