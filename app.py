"""LoRA Merge Space: a thin Gradio front end over ``merge_core.pipeline``, which does all the work.

This file lays out the page, maps it to ``MergeForm``/``PushForm`` and from ``MergeView``/``PushView``
by field name, keeps each session's result in a ``gr.State`` (its claimed folder removed when replaced,
on error and when the session ends); the forward-pass checks run inside ``spaces.GPU`` (app_gpu.py).
"""

from __future__ import annotations

# isort: split
import html
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app_gpu import run_checks
from app_layout import PAGE_CSS, form_section, generation_section, push_section, results_section
from merge_core import pipeline
from merge_core.adapter_choices import discover_adapters
from merge_core.pipeline import (  # the names this page uses most
    KEEP,
    MergeForm,
    MergeResult,
    MergeView,
    Prefill,
    PushForm,
    PushView,
    StreamForm,
    VerificationReport,
    field_names,
    form_from,
    view_updates,
)

log = logging.getLogger("lora_merge_space")

HERE = Path(__file__).resolve().parent
DEMO_DIR = Path(os.environ.get("LMS_DEMO_DIR") or HERE / "demo").resolve()
ON_SPACE = os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("SPACE_ID"))
# Off a Space, gradio mocks OAuth with the machine's own HF login (and refuses to start without
# one), so the login button is opt-in there; the pasted token works everywhere.
SHOW_LOGIN = ON_SPACE or os.environ.get("LMS_MOCK_LOGIN") == "1"
MOCK_OAUTH_TOKEN = "mock-oauth-token-for-local-dev"
# Local folders are a server-side read: on a public Space only the bundled demo may be read
# (the HF cache holds gated models other users downloaded). LMS_ALLOW_LOCAL_PATHS=1 lifts this
# for a private, local run.
ALLOW_LOCAL_PATHS = os.environ.get("LMS_ALLOW_LOCAL_PATHS") == "1"
LOCAL = pipeline.LocalPaths(DEMO_DIR, allow_any=ALLOW_LOCAL_PATHS)
LOGIN_HINT = (
    "To push, sign in with Hugging Face (button at the top) or paste a write token."
    if SHOW_LOGIN
    else "To push, paste a write token (huggingface.co/settings/tokens) into 'or paste a write token'. "
    "(Sign in with Hugging Face is offered when this app runs as a Space.)"
)

STATE_TTL_SECONDS = 2 * 3600


# --- small helpers ----------------------------------------------------------------------------------


def _token(pasted: str | None, oauth_token: gr.OAuthToken | None) -> str | None:
    """The pasted token if any, else the login's token. Never stored, logged or returned."""
    pasted = (pasted or "").strip()
    if pasted:
        return pasted
    if oauth_token is not None and oauth_token.token:
        if oauth_token.token == MOCK_OAUTH_TOKEN and not ON_SPACE:
            from huggingface_hub import get_token  # gradio's local mock login stands for this machine's login

            return get_token()
        return oauth_token.token
    return None


def _oauth_scope(pasted: str | None, oauth_token: gr.OAuthToken | None) -> str | None:
    """The login's scopes when its token is the one used (whoami-v2 does not show an OAuth token's scopes);
    None for a pasted token and for the local mock, which stands for this machine's own token."""
    if (pasted or "").strip() or oauth_token is None or not oauth_token.token:
        return None
    return None if oauth_token.token == MOCK_OAUTH_TOKEN and not ON_SPACE else oauth_token.scope


def _owner(token: str | None, profile: gr.OAuthProfile | None) -> str:
    if profile is not None:
        return profile.username
    try:
        return pipeline.whoami_name(token) if token else ""
    except Exception:  # noqa: BLE001 - without a name, pipeline.push_merged adds the owner itself
        return ""


# --- rendering ---------------------------------------------------------------------------------------


def _error(message: str) -> dict[str, Any]:
    return gr.update(value=f"⚠️ {html.escape(message, quote=False)}", visible=True)


NO_ERROR = gr.update(value="", visible=False)


def _table(report: VerificationReport | None) -> pd.DataFrame:
    return pd.DataFrame(report.rows() if report else [], columns=VerificationReport.HEADERS)


def _failed(message: str) -> MergeView:
    return MergeView.cleared(
        state=None,
        error=_error(message),
        table=_table(None),
        push_btn=gr.update(interactive=False),
        merge_btn=gr.update(interactive=True),
    )


# --- handlers ------------------------------------------------------------------------------------------


def discard(result: MergeResult | None) -> None:
    """gr.State delete_callback: remove a session's merge folder."""
    if isinstance(result, MergeResult):
        pipeline.cleanup(result)


def merge(
    form: MergeForm,
    oauth_token: gr.OAuthToken | None = None,
    profile: gr.OAuthProfile | None = None,
    progress: Any = None,
    session: str | None = None,
) -> MergeView:
    """One merge for one session: the previous result is replaced, a failure shows one sentence."""
    progress = progress or (lambda *args, **kwargs: None)
    token = _token(form.token, oauth_token)
    try:
        with pipeline.session_slot(session):
            previous = form.state if isinstance(form.state, MergeResult) else None
            previous_name = previous.inputs.suggested_name if previous else None
            discard(previous)
            try:
                result = pipeline.run_job(  # progress: bytes come from worker threads
                    form,
                    token=token,
                    local=LOCAL,
                    progress=pipeline.in_caller_context(progress),
                    run_checks=run_checks,
                    user_errors=(gr.Error,),
                    oauth_scope=_oauth_scope(form.token, oauth_token),
                )
            except Exception as exc:  # noqa: BLE001 - never a stack trace in the page; the app keeps serving
                message = pipeline.failure_message(exc, token, user_errors=(gr.Error,))
                return _failed(message + pipeline.disk_hint(exc))  # too large for this disk: the streamed mode
    except pipeline.SessionBusyError as exc:  # the session already runs a merge: leave its result alone
        return MergeView.kept(error=_error(str(exc)), merge_btn=gr.update(interactive=True))
    owner = lambda: _owner(token, profile)  # noqa: E731 - asked only when a name is suggested
    view = MergeView.of_result(
        result,
        form.prompt,
        error=NO_ERROR,
        table=_table(result.verification),
        repo_name=pipeline.suggest_repo_id(form.repo_name, previous_name, result.inputs.suggested_name, owner),
        push_btn=gr.update(interactive=True),
        merge_btn=gr.update(interactive=True),
    )
    timed = result.speed
    if timed is not None:  # beside the generations: merged vs separate, measured
        view.gen_note = f"{view.gen_note}\n\n{pipeline.speed_markdown(timed)}"
    return view


def push(
    form: PushForm,
    oauth_token: gr.OAuthToken | None = None,
    profile: gr.OAuthProfile | None = None,
    progress: Any = None,
) -> PushView:
    """Preflight the target first thing (token, namespace, free or existing repo), then one commit."""
    progress = progress or (lambda *args, **kwargs: None)
    result = form.state
    has_result = isinstance(result, MergeResult) and result.output_dir.is_dir()

    def failure(message: str) -> PushView:
        return PushView(
            gr.update(value="", visible=False),
            _error(message),
            gr.update(interactive=True),
            gr.update(interactive=has_result),
        )

    if not has_result:
        return failure("There is no merged model in this session (it may have expired); merge first, then push.")
    token = _token(form.token, oauth_token)
    if not token:
        return failure(LOGIN_HINT)
    repo_id = (form.repo_name or "").strip() or result.inputs.suggested_name
    if "/" not in repo_id and profile is not None:
        repo_id = f"{profile.username}/{repo_id}"
    try:
        progress(0, desc=f"Uploading to {repo_id} …")
        pushed = pipeline.push_merged(
            result,
            repo_id,
            token=token,
            private=bool(form.private),
            mode=pipeline.push_mode_of(form.push_mode),
            progress=pipeline.progress_adapter(pipeline.in_caller_context(progress)),  # from the upload thread
            oauth_scope=_oauth_scope(form.token, oauth_token),
        )
    except Exception as exc:  # noqa: BLE001 - one sentence, never a stack trace
        return failure(pipeline.failure_message(exc, token, action="pushing", user_errors=(gr.Error,)))
    return PushView(
        gr.update(value=pipeline.push_markdown(pushed, list(result.gguf_files)), visible=True),
        NO_ERROR,
        gr.update(interactive=True),
        gr.update(interactive=True),
    )


def discover(
    adapter: str | None,
    adapter_revision: str | None,
    pasted_token: str | None,
    picked: str | None,
    listed: str | None,
    oauth_token: gr.OAuthToken | None = None,
) -> tuple[Any, str]:
    """The adapter picker and what it lists: the subfolder adapters of the entered repo or folder, hidden
    when there are none or the ID cannot be listed (the merge says why). The same entry is not listed
    twice in a row (blur follows Enter; a refresh would close an open list), and a picked one stays."""
    token = _token(pasted_token, oauth_token)
    key = repr(((adapter or "").strip(), (adapter_revision or "").strip(), bool(token)))
    if key == listed or (picked and (adapter or "").strip() == picked):
        return gr.skip(), key
    found = discover_adapters(adapter, revision=adapter_revision, token=token, local=LOCAL)
    return gr.update(choices=list(found.choices), value=found.selected, visible=bool(found.choices)), key


def merge_to_hub(
    form: MergeForm,
    stream: StreamForm,
    oauth_token: gr.OAuthToken | None = None,
    profile: gr.OAuthProfile | None = None,
    progress: Any = None,
    session: str | None = None,
) -> tuple[MergeView, dict[str, Any]]:
    """'Merge straight to my Hub repo': target preflighted first, then download, merge and upload at once
    (one commit, nothing kept here); the view and the push result (link and snippets)."""
    progress = progress or (lambda *args, **kwargs: None)
    token = _token(form.token, oauth_token)
    hidden = gr.update(value="", visible=False)
    try:
        with pipeline.session_slot(session):
            discard(form.state if isinstance(form.state, MergeResult) else None)  # free this session's disk first
            typed = (form.repo_name or "").strip()
            owner = _owner(token, profile) if typed and "/" not in typed else ""
            try:
                done = pipeline.stream_to_hub(
                    form,
                    stream,
                    token=token,
                    local=LOCAL,
                    owner=owner,
                    progress=pipeline.stream_progress(pipeline.in_caller_context(progress)),
                    oauth_scope=_oauth_scope(form.token, oauth_token),
                )
            except Exception as exc:  # noqa: BLE001 - never a stack trace in the page; the app keeps serving
                return _failed(pipeline.failure_message(exc, token, user_errors=(gr.Error,))), hidden
    except pipeline.SessionBusyError as exc:
        return MergeView.kept(error=_error(str(exc)), merge_btn=gr.update(interactive=True)), KEEP
    view = done.view(
        error=NO_ERROR,
        table=_table(done.verification),
        push_btn=gr.update(interactive=False),  # nothing here to push: the repo holds the merge
        merge_btn=gr.update(interactive=True),
    )
    return view, gr.update(value=done.push_result, visible=True)


def prefill(request: gr.Request | None) -> Prefill:
    """The form as the page's link asks (?adapter=…&base=…&adapter_revision=…&base_revision=…&dtype=…),
    under the typed input's rules; it never starts a merge."""
    params = getattr(request, "query_params", None) or {}
    filled = pipeline.prefill({k: params.get(k) or "" for k in field_names(Prefill)}, LOCAL)
    filled.error = _error(filled.error) if isinstance(filled.error, str) else filled.error
    return filled


# --- layout ------------------------------------------------------------------------------------------


def _handlers(ui: dict[str, Any]) -> tuple[Callable[..., Any], ...]:
    """Handlers get {component: value} and return {component: update}: order lives nowhere."""

    def on_merge(
        values: dict[Any, Any],
        request: gr.Request,
        oauth_token: gr.OAuthToken | None = None,
        profile: gr.OAuthProfile | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects the tracker by this default
    ) -> dict[Any, Any]:
        session = getattr(request, "session_hash", None)
        view = merge(form_from(MergeForm, values, ui), oauth_token, profile, progress, session=session)
        return view_updates(view, ui)

    def on_push(
        values: dict[Any, Any],
        oauth_token: gr.OAuthToken | None = None,
        profile: gr.OAuthProfile | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects the tracker by this default
    ) -> dict[Any, Any]:
        return view_updates(push(form_from(PushForm, values, ui), oauth_token, profile, progress), ui)

    def on_stream(
        values: dict[Any, Any],
        request: gr.Request,
        oauth_token: gr.OAuthToken | None = None,
        profile: gr.OAuthProfile | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects the tracker by this default
    ) -> dict[Any, Any]:
        session = getattr(request, "session_hash", None)
        form, stream = form_from(MergeForm, values, ui), form_from(StreamForm, values, ui)
        view, pushed = merge_to_hub(form, stream, oauth_token, profile, progress, session=session)
        updates = {**view_updates(view, ui), ui["stream_btn"]: gr.update(interactive=True)}
        return updates if pushed is KEEP else {**updates, ui["push_result"]: pushed}

    def start_merge() -> dict[Any, Any]:
        """Runs first (unqueued): clear the old results and lock both buttons while a merge runs."""
        locked = gr.update(interactive=False)
        cleared = MergeView.kept(error=NO_ERROR, table=_table(None), push_btn=locked, merge_btn=locked)
        cleared.verdict = cleared.gen_base = cleared.gen_adapter = cleared.gen_merged = ""
        cleared.gen_note = cleared.sizes = cleared.summary = ""
        return {**view_updates(cleared, ui), ui["push_result"]: gr.update(value="", visible=False)}

    def start_push() -> dict[Any, Any]:
        """Runs first (unqueued): lock both buttons; the result box shows the upload's progress."""
        locked = gr.update(interactive=False)
        return view_updates(PushView(gr.update(value="Pushing …", visible=True), NO_ERROR, locked, locked), ui)

    return on_merge, on_push, on_stream, start_merge, start_push


def _wire(ui: dict[str, Any]) -> None:
    on_merge, on_push, on_stream, start_merge, start_push = _handlers(ui)
    merge_outputs = [ui[name] for name in field_names(MergeView)]
    # The API is /merge and /push (README, "The app"); the button-locking steps are the page's own.
    hidden = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    first = ui["merge_btn"].click(start_merge, None, [*merge_outputs, ui["push_result"]], **hidden)
    merge_inputs = {ui[n] for n in field_names(MergeForm)}
    first.then(on_merge, merge_inputs, merge_outputs, show_progress_on=[ui["verdict"]], api_name="merge")
    push_outputs = [ui[name] for name in field_names(PushView)]
    first = ui["push_btn"].click(start_push, None, push_outputs, **hidden)
    push_inputs = {ui[n] for n in field_names(PushForm)}
    first.then(on_push, push_inputs, push_outputs, show_progress_on=[ui["push_result"]], api_name="push")
    # The streamed mode: the merge's inputs plus the push settings, the merge's outputs plus the push result.
    stream_outputs = [*merge_outputs, ui["push_result"], ui["stream_btn"]]
    locked = {ui["stream_btn"]: gr.update(interactive=False)}
    first = ui["stream_btn"].click(lambda: {**start_merge(), **locked}, None, stream_outputs, **hidden)
    stream_inputs = merge_inputs | {ui[n] for n in field_names(StreamForm)}
    first.then(on_stream, stream_inputs, stream_outputs, show_progress_on=[ui["verdict"]], api_name="merge_to_hub")


def _wire_discovery(ui: dict[str, Any], loaded: Any) -> None:
    """The picker lists on blur, Enter and after a link filled the form (never per keystroke: each
    listing asks the Hub); picking only fills the adapter field, it never starts a merge."""
    listing = {"show_progress": "hidden", "api_visibility": "private"}
    listed = gr.State("")  # the entry the picker shows: a key of the field's text, never the token
    inputs = [ui["adapter"], ui["adapter_revision"], ui["token"], ui["adapter_choice"], listed]
    outputs = [ui["adapter_choice"], listed]
    triggers = [ui["adapter"].blur, ui["adapter"].submit]
    gr.on(triggers, discover, inputs, outputs, trigger_mode="always_last", **listing)
    loaded.then(discover, inputs, outputs, **listing)
    ui["adapter_choice"].input(
        lambda picked: picked or gr.skip(), ui["adapter_choice"], ui["adapter"], queue=False, **listing
    )


def build_demo() -> gr.Blocks:
    pipeline.sweep_workdirs()  # folders of merges whose process died (a restart, an out-of-memory kill)
    ui: dict[str, Any] = {}
    with gr.Blocks(title="LoRA Merge Space") as demo:
        gr.Markdown(
            "# LoRA Merge Space\n"
            "Merge a LoRA adapter into its base model (W' = W + scale · B @ A, streamed shard by shard), "
            "verify the result against the base and the adapter, and push it to the Hub."
        )
        form_section(ui, show_login=SHOW_LOGIN, has_demo=LOCAL.has_demo())
        generation_section(ui, LOCAL.demo_prompts())
        results_section(ui, empty_table=_table(None))
        push_section(ui)
        ui["state"] = gr.State(None, time_to_live=STATE_TTL_SECONDS, delete_callback=discard)
        _wire(ui)

        def end_session(request: gr.Request) -> None:
            """Tab closed: remove this session's merge folder now rather than when gradio expires the
            state (an hour after the tab closes)."""
            holder = getattr(demo, "state_holder", None)
            session = getattr(request, "session_hash", None)
            if holder is not None and session:
                try:
                    holder.delete_state(session)  # calls discard() on the session's gr.State
                except Exception:
                    log.warning("could not clean up session state", exc_info=True)

        demo.unload(end_session)
        prefill_outputs = [ui[name] for name in field_names(Prefill)]

        def on_load(request: gr.Request) -> dict[Any, Any]:
            # gr.skip() rather than leaving fields out: gradio refuses an empty dict of updates
            filled = prefill(request)
            return {
                ui[n]: gr.skip() if getattr(filled, n) is KEEP else getattr(filled, n) for n in field_names(Prefill)
            }

        loaded = demo.load(
            on_load, None, prefill_outputs, queue=False, show_progress="hidden", api_visibility="private"
        )
        _wire_discovery(ui, loaded)
    demo.queue(default_concurrency_limit=2)
    return demo


demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    demo.launch(
        css=PAGE_CSS,
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
