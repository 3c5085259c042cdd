"""One front-end request as a job: the form becomes a request, the merge runs in a claimed
per-request folder, the model checks run through a caller-given runner (the app's GPU slot),
and any failure becomes one sentence with the token scrubbed. Free of any UI toolkit."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import MergeError, explain_os_error
from .frontend import KEEP, PUSH_MODE_LABELS, LocalPaths, MergeForm, merge_request, progress_adapter
from .generate import GenerationSettings
from .hub import HubClient, PushMode, PushResult
from .verify import Check

if TYPE_CHECKING:
    from .pipeline import MergeResult, ModelChecks

log = logging.getLogger("lora_merge_space")

# Runs the forward-pass checks and the sample: (result, settings, functional) -> ModelChecks.
ChecksRunner = Callable[["MergeResult", "GenerationSettings | None", str], "ModelChecks"]


def scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _settings(form: MergeForm) -> GenerationSettings | None:
    if not (form.prompt or "").strip():
        return None
    return GenerationSettings(
        prompt=form.prompt,
        max_new_tokens=int(form.max_new_tokens),
        temperature=float(form.temperature),
        seed=int(form.seed or 0),
    )


def _with_model_checks(
    result: MergeResult,
    form: MergeForm,
    functional: str,
    run_checks: ChecksRunner,
    *,
    token: str | None,
    user_errors: tuple[type[BaseException], ...],
) -> None:
    from . import pipeline  # at call time: pipeline re-exports this module

    try:
        checks = run_checks(result, _settings(form), functional)
    except Exception as exc:  # noqa: BLE001 - the merge stands; say why the extra checks are missing
        reason = str(exc) if isinstance(exc, user_errors) else type(exc).__name__
        log.warning("model checks failed: %s", scrub(traceback.format_exc(), token))
        detail = f"skipped: could not run ({scrub(reason, token)})"
        checks = pipeline.ModelChecks(
            [Check("forward-pass checks and sample", "function", None, "-", "-", detail)], None
        )
    pipeline.add_model_checks(result, checks)


def push_mode_of(label: str | None) -> PushMode:
    """The mode a page's push-mode label (or a plain mode value) names; nothing chosen is a new repo."""
    return PushMode.parse(PUSH_MODE_LABELS.get(label or "", label or "new"))


def check_push_permission(
    form: MergeForm, token: str | None, *, oauth_scope: str | None = None, endpoint: str | None = None
) -> None:
    """Before a merge: with a login or token and a target repo the user chose, the token must hold the
    push mode's permission (merge_core.permissions), so that a refusal costs no download. The repo's
    existence is Push's to check: a re-merge after a push must pass. The name a previous merge
    suggested is not a choice yet, unless a mode other than "new" was picked for it."""
    repo_id = (form.repo_name or "").strip()
    mode = push_mode_of(form.push_mode)
    previous = getattr(getattr(form.state, "inputs", None), "suggested_name", None)
    if not token or not repo_id or (mode is PushMode.NEW and repo_id.split("/")[-1] == previous):
        return
    HubClient(token, endpoint, oauth_scope=oauth_scope).check_push_permission(repo_id, mode)


def run_job(
    form: MergeForm,
    *,
    token: str | None,
    local: LocalPaths,
    progress: Callable[..., Any],
    run_checks: ChecksRunner,
    user_errors: tuple[type[BaseException], ...] = (),
    oauth_scope: str | None = None,
) -> MergeResult:
    """The merge in a claimed per-request folder (Hub downloads included, so removing the
    folder frees the disk again); on any failure the folder is removed before raising.
    The push mode's permission is checked first (check_push_permission)."""
    from . import pipeline  # at call time: pipeline re-exports this module (and tests patch run_merge there)

    request = merge_request(form, token, local)
    check_push_permission(form, token, oauth_scope=oauth_scope, endpoint=request.endpoint)
    claimed = pipeline.new_workdir()  # sweeps the folders of dead processes first
    try:
        request.cache_dir = claimed.folder / "hub"
        progress(0, desc="Resolving inputs …")
        result = pipeline.run_merge(request, claimed.folder, progress=progress_adapter(progress))
        result.workdir_claim = claimed
    except BaseException:
        claimed.release(remove_folder=True)
        raise
    progress(0.95, desc="Forward-pass checks and sample generation …")
    try:
        _with_model_checks(
            result,
            form,
            request.functional,
            run_checks,
            token=token,
            user_errors=(MergeError, ValueError, *user_errors),
        )
    except BaseException:
        pipeline.cleanup(result)
        raise
    return result


def failure_message(
    exc: BaseException, token: str | None, *, action: str = "merging", user_errors: tuple[type[BaseException], ...] = ()
) -> str:
    """One sentence for the page: ours and the OS's in their own words, anything else by type only."""
    if isinstance(exc, (MergeError, ValueError, *user_errors)):
        return scrub(str(exc), token)
    if isinstance(exc, OSError):
        return scrub(explain_os_error(exc, "read or write", exc.filename or "a working file"), token)
    log.error("%s failed: %s", action, scrub("".join(traceback.format_exception(exc)), token))
    kept = "; nothing was kept" if action == "merging" else ""
    return (
        f"Unexpected error ({type(exc).__name__}) while {action}{kept}. "
        "Please try again, or report it with the adapter and base IDs."
    )


def suggest_repo_id(typed: str, previous_name: str | None, suggested: str, owner: Callable[[], str]) -> Any:
    """owner/suggested unless the user typed a name of their own (then KEEP it)."""
    current = (typed or "").strip()
    if current and not (previous_name and current.split("/")[-1] == previous_name):
        return KEEP
    name = owner()
    return f"{name}/{suggested}" if name else suggested


def push_markdown(pushed: PushResult, gguf_types: list[str] | None = None) -> str:
    """The pushed repo's links, then how to run it (transformers, vLLM, TGI; llama.cpp/Ollama with GGUF files)."""
    from .card import gguf_snippets, usage_snippets

    lines = [
        f"### ✅ Pushed to [{pushed.repo_id}]({pushed.repo_url})",
        f"Commit [`{pushed.commit_oid[:10]}`]({pushed.commit_url})",
    ]
    if pushed.pr_url:
        lines.append(f"Pull request: [{pushed.pr_url}]({pushed.pr_url})")
    lines.append(
        "#### Use it\n\n"
        + "\n".join([*usage_snippets(pushed.repo_id), "", *gguf_snippets(pushed.repo_id, gguf_types or [])])
    )
    return "\n\n".join(lines)


__all__ = [
    "ChecksRunner",
    "check_push_permission",
    "failure_message",
    "push_markdown",
    "push_mode_of",
    "run_job",
    "scrub",
    "suggest_repo_id",
]
