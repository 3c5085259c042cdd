"""LoRA Merge Space: a thin Gradio front end over ``merge_core.pipeline``.

Merge, verification, model card and push all live in ``merge_core``; this file only maps the
form (``MergeForm``, ``PushForm``) to the pipeline and its results to the page (``MergeView``,
``PushView``) by field name, adapts progress, keeps each session's result in a ``gr.State``
(one claimed folder per merge, removed when replaced, on error and when the session ends; a
sweep removes those of dead processes) and runs the forward-pass checks inside ``spaces.GPU``.
"""

from __future__ import annotations

import html
import json
import logging
import os
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import gradio as gr
import pandas as pd
import spaces  # must come before anything that initialises CUDA (ZeroGPU)
import torch

from merge_core.pipeline import (
    COMBINATION_TYPES,
    LIMITS,
    Check,
    GenerationSettings,
    MergeError,
    MergeRequest,
    MergeResult,
    ModelChecks,
    PushMode,
    SessionBusyError,
    VerificationReport,
    add_model_checks,
    check_limits,
    cleanup,
    explain_os_error,
    model_checks,
    new_workdir,
    parse_adapter_list,
    progress_adapter,
    push_merged,
    run_merge,
    sample_note,
    session_slot,
    sizes_markdown,
    sweep_workdirs,
    verdict_markdown,
    whoami_name,
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
LOGIN_HINT = ("To push, sign in with Hugging Face (button at the top) or paste a write token." if SHOW_LOGIN else
              "To push, paste a write token (huggingface.co/settings/tokens) into 'or paste a write token'. "
              "(Sign in with Hugging Face is offered when this app runs as a Space.)")

DTYPES = ["auto", "float16", "bfloat16", "float32"]
PUSH_MODES = {"Create new repo": PushMode.NEW, "Update existing repo": PushMode.UPDATE,
              "Open a pull request": PushMode.PR}
FUNCTIONAL = {"auto (when it fits in memory)": "auto", "always": "always", "never": "never"}
STATE_TTL_SECONDS = 2 * 3600
GPU_BASE_SECONDS, GPU_SECONDS_PER_GB, GPU_MAX_SECONDS = 60, 8, 240


# --- small helpers ----------------------------------------------------------------------------------


def _demo_prompts() -> list[str]:
    try:
        prompts = json.loads((DEMO_DIR / "prompts.json").read_text(encoding="utf-8"))
        return [str(p) for p in prompts if str(p).strip()]
    except (OSError, ValueError, TypeError):
        return []


def _has_demo() -> bool:
    return (DEMO_DIR / "base").is_dir() and (DEMO_DIR / "adapter").is_dir()


def _within(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the filesystem is no folder: the Hub ID rules refuse it
        return False


def _source(text: str, what: str) -> str:
    """A Hub ID as typed, or an absolute path for the bundled demo ("demo/base"); other local
    folders are refused unless LMS_ALLOW_LOCAL_PATHS=1."""
    text = (text or "").strip()
    if not text:
        return ""
    rel = text.removeprefix("./")
    if rel.startswith("demo/") and _is_dir(DEMO_DIR / rel[len("demo/"):]):
        candidate = DEMO_DIR / rel[len("demo/"):]
        if _within(candidate, DEMO_DIR):
            return str(candidate.resolve())
    path = Path(text).expanduser()
    looks_local = text.startswith((".", "/", "~", "\\")) or (len(text) > 1 and text[1] == ":") or _is_dir(path)
    if not looks_local:
        return text
    if ALLOW_LOCAL_PATHS or (_within(path, DEMO_DIR) and _is_dir(path)):
        return str(path.resolve()) if _is_dir(path) else text
    raise ValueError(f"{what} {text!r} is a local path. This app reads models from the Hub only (plus the bundled "
                     "demo, demo/base and demo/adapter): enter a Hub ID like owner/name.")


def _adapters(text: str) -> str:
    """The adapter field (one adapter, or several as "a/b, c/d:0.5") with every entry checked by _source."""
    entries = parse_adapter_list(text or "")
    if len(entries) == 1 and entries[0][1] == 1.0:
        return _source(entries[0][0], "Adapter")
    return ", ".join(f"{_source(spec, 'Adapter')}:{weight!r}" for spec, weight in entries)


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


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


# --- GPU part: the only code that ZeroGPU runs on a GPU ------------------------------------------------


def _gpu_seconds(base_dir: Path, adapter_dir: Path, output_dir: Path, settings: GenerationSettings | None,
                 merged_gb: float, functional: str = "auto") -> int:
    """ZeroGPU reservation: loading base+adapter and the merged model dominates, so it grows with size."""
    return int(min(GPU_MAX_SECONDS, GPU_BASE_SECONDS + GPU_SECONDS_PER_GB * max(0.0, merged_gb)))


@spaces.GPU(duration=_gpu_seconds)
def run_model_checks(base_dir: Path, adapter_dir: Path, output_dir: Path, settings: GenerationSettings | None,
                     merged_gb: float, functional: str = "auto") -> ModelChecks:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model_checks(base_dir, adapter_dir, output_dir, settings, device=device, functional=functional)


# --- rendering ---------------------------------------------------------------------------------------


def _error(message: str) -> dict[str, Any]:
    return gr.update(value=f"⚠️ {html.escape(message, quote=False)}", visible=True)


NO_ERROR = gr.update(value="", visible=False)


def _table(report: VerificationReport | None) -> pd.DataFrame:
    return pd.DataFrame(report.rows() if report else [], columns=VerificationReport.HEADERS)


# --- the form and the page, by field name --------------------------------------------------------------

class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()  # a view field left as it is on the page


@dataclass
class MergeForm:
    """What the merge button sends; each field is the component of the same name (see build_demo)."""

    adapter: str = ""
    base: str = ""
    adapter_revision: str = ""
    base_revision: str = ""
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    functional: str = next(iter(FUNCTIONAL))
    combination: str = "stack"
    density: Optional[float] = None
    prompt: str = ""
    max_new_tokens: float = 48
    temperature: float = 0.0
    seed: float = 0
    repo_name: str = ""
    token: str = ""  # the pasted token; never stored, logged or returned
    state: Optional[MergeResult] = None  # the session's previous result


@dataclass
class MergeView:
    """What a merge shows; a field left at KEEP does not change on the page."""

    state: Any = None
    error: Any = None
    verdict: Any = ""
    table: Any = None
    gen_base: Any = ""
    gen_adapter: Any = ""
    gen_merged: Any = ""
    gen_note: Any = ""
    sizes: Any = ""
    summary: Any = ""
    repo_name: Any = KEEP
    push_btn: Any = None
    merge_btn: Any = None

    @classmethod
    def failed(cls, message: str) -> MergeView:
        return cls(state=None, error=_error(message), table=_table(None),
                   push_btn=gr.update(interactive=False), merge_btn=gr.update(interactive=True))


@dataclass
class PushForm:
    repo_name: str = ""
    private: bool = False
    push_mode: str = "Create new repo"
    token: str = ""
    state: Optional[MergeResult] = None


@dataclass
class PushView:
    push_result: Any = None
    error: Any = None
    merge_btn: Any = None
    push_btn: Any = None


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _updates(view: Any, ui: dict[str, Any]) -> dict[Any, Any]:
    """A view as gradio's {component: value}, leaving out the fields kept as they are."""
    return {ui[name]: getattr(view, name) for name in _names(type(view)) if getattr(view, name) is not KEEP}


def _form(cls: type, values: dict[Any, Any], ui: dict[str, Any]) -> Any:
    return cls(**{name: values[ui[name]] for name in _names(cls)})


# --- handlers ------------------------------------------------------------------------------------------


def discard(result: MergeResult | None) -> None:
    """gr.State delete_callback: remove a session's merge folder."""
    if isinstance(result, MergeResult):
        cleanup(result)


def _request(form: MergeForm, token: Optional[str]) -> MergeRequest:
    check_limits(prompt=form.prompt, max_new_tokens=form.max_new_tokens, fields={
        "Adapter": form.adapter, "Base model": form.base, "Adapter revision": form.adapter_revision,
        "Base revision": form.base_revision, "Max shard size": form.max_shard_size, "Target repo": form.repo_name})
    if (form.dtype or "auto") not in DTYPES:
        raise ValueError(f"Unknown dtype {form.dtype!r}; choose one of {', '.join(DTYPES)}.")
    request = MergeRequest(
        adapter=_adapters(form.adapter), base=_source(form.base, "Base model"),
        adapter_revision=(form.adapter_revision or "").strip() or None,
        base_revision=(form.base_revision or "").strip() or None,
        dtype=form.dtype or "auto", max_shard_size=(form.max_shard_size or "").strip() or "5GB",
        token=token, functional=FUNCTIONAL.get(form.functional, form.functional or "auto"),
        combination=form.combination or "stack", density=float(form.density) if form.density else None,
        # Defence in depth: merge_core itself refuses folders outside the demo.
        local_roots=None if ALLOW_LOCAL_PATHS else [DEMO_DIR],
    )
    request.options()  # a bad shard size or dtype is refused before a folder is made
    return request


def _with_model_checks(result: MergeResult, form: MergeForm, request: MergeRequest, token: Optional[str]) -> None:
    settings = None
    if (form.prompt or "").strip():
        settings = GenerationSettings(prompt=form.prompt, max_new_tokens=int(form.max_new_tokens),
                                      temperature=float(form.temperature), seed=int(form.seed or 0))
    try:
        checks = run_model_checks(result.base_dir, result.adapter_dir, result.output_dir, settings,
                                  result.sizes()["merged_gb"], request.functional)
    except Exception as exc:  # noqa: BLE001 - the merge stands; say why the extra checks are missing
        reason = str(exc) if isinstance(exc, (MergeError, ValueError, gr.Error)) else type(exc).__name__
        log.warning("model checks failed: %s", _scrub(traceback.format_exc(), token))
        checks = ModelChecks([Check("forward-pass checks and sample", "function", None, "-", "-",
                                    f"skipped: could not run ({_scrub(reason, token)})")], None)
    add_model_checks(result, checks)


def _run(form: MergeForm, token: Optional[str], progress: Any) -> MergeResult:
    """The merge in a claimed per-request folder (Hub downloads included, so removing the
    folder frees the disk again); on any failure the folder is removed before raising."""
    request = _request(form, token)
    claimed = new_workdir()  # sweeps the folders of dead processes first
    try:
        request.cache_dir = claimed.folder / "hub"
        progress(0, desc="Resolving inputs …")
        result = run_merge(request, claimed.folder, progress=progress_adapter(progress))
        result.workdir_claim = claimed
    except BaseException:
        claimed.release(remove_folder=True)
        raise
    progress(0.95, desc="Forward-pass checks and sample generation …")
    try:
        _with_model_checks(result, form, request, token)
    except BaseException:
        cleanup(result)
        raise
    return result


def _repo_name(form: MergeForm, result: MergeResult, previous_name: Optional[str], token: Optional[str],
               profile: gr.OAuthProfile | None) -> Any:
    """Suggest owner/name unless the user typed a name of their own."""
    current = (form.repo_name or "").strip()
    if current and not (previous_name and current.split("/")[-1] == previous_name):
        return KEEP
    owner = profile.username if profile is not None else ""
    if not owner and token:
        try:
            owner = whoami_name(token)
        except Exception:  # noqa: BLE001 - without a name, push_merged adds the owner itself
            owner = ""
    name = result.inputs.suggested_name
    return f"{owner}/{name}" if owner else name


def _failure_message(exc: BaseException, token: Optional[str]) -> str:
    if isinstance(exc, (MergeError, ValueError, gr.Error)):
        return _scrub(str(exc), token)
    if isinstance(exc, OSError):
        return _scrub(explain_os_error(exc, "read or write", exc.filename or "a working file"), token)
    log.error("merge failed: %s", _scrub("".join(traceback.format_exception(exc)), token))
    return (f"Unexpected error ({type(exc).__name__}) while merging; nothing was kept. "
            "Please try again, or report it with the adapter and base IDs.")


def merge(form: MergeForm, oauth_token: gr.OAuthToken | None = None, profile: gr.OAuthProfile | None = None,
          progress: Any = None, session: Optional[str] = None) -> MergeView:
    """One merge for one session: the previous result is replaced, a failure shows one sentence."""
    progress = progress or (lambda *args, **kwargs: None)
    token = _token(form.token, oauth_token)
    try:
        with session_slot(session):
            previous = form.state if isinstance(form.state, MergeResult) else None
            previous_name = previous.inputs.suggested_name if previous else None
            discard(previous)
            try:
                result = _run(form, token, progress)
            except Exception as exc:  # noqa: BLE001 - never a stack trace in the page; the app keeps serving
                return MergeView.failed(_failure_message(exc, token))
    except SessionBusyError as exc:  # the session already runs a merge: leave its result alone
        return MergeView(state=KEEP, error=_error(str(exc)), verdict=KEEP, table=KEEP, gen_base=KEEP,
                         gen_adapter=KEEP, gen_merged=KEEP, gen_note=KEEP, sizes=KEEP, summary=KEEP,
                         push_btn=KEEP, merge_btn=gr.update(interactive=True))
    sample = result.sample
    return MergeView(state=result, error=NO_ERROR, verdict=verdict_markdown(result.verification),
                     table=_table(result.verification), gen_base=sample.base if sample else "",
                     gen_adapter=sample.adapter if sample else "", gen_merged=sample.merged if sample else "",
                     gen_note=sample_note(result, form.prompt or ""), sizes=sizes_markdown(result),
                     summary=result.report.summary(), repo_name=_repo_name(form, result, previous_name, token, profile),
                     push_btn=gr.update(interactive=True), merge_btn=gr.update(interactive=True))


def push(form: PushForm, oauth_token: gr.OAuthToken | None = None, profile: gr.OAuthProfile | None = None,
         progress: Any = None) -> PushView:
    """Preflight the target first thing (token, namespace, free or existing repo), then one commit."""
    progress = progress or (lambda *args, **kwargs: None)
    result = form.state
    has_result = isinstance(result, MergeResult) and result.output_dir.is_dir()

    def failure(message: str) -> PushView:
        return PushView(gr.update(value="", visible=False), _error(message), gr.update(interactive=True),
                        gr.update(interactive=has_result))

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
        pushed = push_merged(result, repo_id, token=token, private=bool(form.private),
                             mode=PUSH_MODES.get(form.push_mode, form.push_mode or "new"),
                             progress=progress_adapter(progress))
    except (MergeError, ValueError, gr.Error) as exc:
        return failure(_scrub(str(exc), token))
    except Exception as exc:  # noqa: BLE001
        log.error("push failed: %s", _scrub(traceback.format_exc(), token))
        return failure(f"Unexpected error ({type(exc).__name__}) while pushing. Please try again.")
    lines = [f"### ✅ Pushed to [{pushed.repo_id}]({pushed.repo_url})",
             f"Commit [`{pushed.commit_oid[:10]}`]({pushed.commit_url})"]
    if pushed.pr_url:
        lines.append(f"Pull request: [{pushed.pr_url}]({pushed.pr_url})")
    return PushView(gr.update(value="\n\n".join(lines), visible=True), NO_ERROR, gr.update(interactive=True),
                    gr.update(interactive=True))


# --- layout ------------------------------------------------------------------------------------------


def _form_section(ui: dict[str, Any], prompts: list[str]) -> None:
    with gr.Row():
        if SHOW_LOGIN:
            gr.LoginButton()
        ui["token"] = gr.Textbox(label="or paste a write token", type="password", placeholder="hf_…",
                                 elem_id="token-box", scale=2,
                                 info="Used for this request only: never stored, logged or shown.")
    with gr.Row():
        ui["adapter"] = gr.Textbox(label="Adapter", placeholder="owner/lora-adapter (Hub ID)", elem_id="adapter-id")
        ui["base"] = gr.Textbox(label="Base model (optional)",
                                placeholder="empty: the adapter's base (base_model_name_or_path)", elem_id="base-id")
        ui["dtype"] = gr.Dropdown(DTYPES, value="auto", label="Output dtype", elem_id="dtype")
    with gr.Accordion("Advanced", open=False), gr.Row():
        ui["adapter_revision"] = gr.Textbox(label="Adapter revision", placeholder="main (branch, tag or commit)",
                                            elem_id="adapter-revision")
        ui["base_revision"] = gr.Textbox(label="Base revision", placeholder="main (branch, tag or commit)",
                                         elem_id="base-revision")
        ui["max_shard_size"] = gr.Textbox(label="Max shard size", value="5GB", elem_id="shard-size")
        ui["functional"] = gr.Dropdown(list(FUNCTIONAL), value=next(iter(FUNCTIONAL)),
                                       label="Logits check vs PeftModel", elem_id="functional")
        ui["combination"] = gr.Dropdown(list(COMBINATION_TYPES), value="stack", elem_id="combination",
                                        label="Several adapters (a/x, b/y:0.5): combine as",
                                        info="stack = sum of weighted deltas; others: PEFT add_weighted_adapter")
        ui["density"] = gr.Number(value=None, label="density (ties/dare/magnitude_prune)", elem_id="density")
    if _has_demo():
        gr.Examples([["demo/adapter", "demo/base"]], inputs=[ui["adapter"], ui["base"]],
                    label="Bundled offline demo (tiny Llama + LoRA)")
    with gr.Accordion("Sample generation", open=True):
        ui["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", max_length=LIMITS.prompt_chars,
                                  value=prompts[0] if prompts else "Explain LoRA in one sentence.")
        with gr.Row():
            ui["max_new_tokens"] = gr.Slider(1, LIMITS.max_new_tokens, value=48, step=1, label="Max new tokens",
                                             elem_id="max-new-tokens")
            ui["temperature"] = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                          elem_id="temperature")
            ui["seed"] = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        if len(prompts) > 1:
            gr.Examples([[p] for p in prompts], inputs=[ui["prompt"]], label="Example prompts")


def _results_section(ui: dict[str, Any]) -> None:
    ui["merge_btn"] = gr.Button("Merge", variant="primary", elem_id="merge-btn")
    ui["error"] = gr.Markdown(visible=False, elem_id="error-box")
    ui["verdict"] = gr.Markdown(elem_id="verdict")
    ui["table"] = gr.Dataframe(value=_table(None), headers=VerificationReport.HEADERS, label="Verification",
                               interactive=False, wrap=True, max_height=1400, elem_id="verify-table",
                               column_widths=["9%", "24%", "24%", "17%", "7%", "19%"])
    with gr.Row():
        ui["gen_base"] = gr.Textbox(label="Base model alone", lines=4, interactive=False, elem_id="gen-base")
        ui["gen_adapter"] = gr.Textbox(label="Base + adapter (PEFT, unmerged)", lines=4, interactive=False,
                                       elem_id="gen-adapter")
        ui["gen_merged"] = gr.Textbox(label="Merged model", lines=4, interactive=False, elem_id="gen-merged")
    ui["gen_note"] = gr.Markdown(elem_id="gen-note")
    ui["sizes"] = gr.Markdown(elem_id="sizes")
    with gr.Accordion("Merge summary", open=False):
        ui["summary"] = gr.Textbox(label="Summary", lines=8, interactive=False, elem_id="summary")


def _push_section(ui: dict[str, Any]) -> None:
    gr.Markdown("## Push to the Hub")
    with gr.Row():
        ui["repo_name"] = gr.Textbox(label="Target repo", placeholder="you/model-merged (filled in after the merge)",
                                     elem_id="repo-name", scale=2)
        ui["private"] = gr.Checkbox(label="Private", value=False, elem_id="private")
        ui["push_mode"] = gr.Radio(list(PUSH_MODES), value="Create new repo", label="Push mode", elem_id="push-mode")
    ui["push_btn"] = gr.Button("Push to Hub", interactive=False, elem_id="push-btn")
    ui["push_result"] = gr.Markdown(visible=False, elem_id="push-result")


def _wire(ui: dict[str, Any]) -> None:
    """Handlers get {component: value} and return {component: update}: order lives nowhere."""

    def on_merge(values: dict[Any, Any], request: gr.Request, oauth_token: gr.OAuthToken | None = None,
                 profile: gr.OAuthProfile | None = None, progress: gr.Progress = gr.Progress()) -> dict[Any, Any]:  # noqa: B008
        view = merge(_form(MergeForm, values, ui), oauth_token, profile, progress,
                     session=getattr(request, "session_hash", None))
        return _updates(view, ui)

    def on_push(values: dict[Any, Any], oauth_token: gr.OAuthToken | None = None,
                profile: gr.OAuthProfile | None = None, progress: gr.Progress = gr.Progress()) -> dict[Any, Any]:  # noqa: B008
        return _updates(push(_form(PushForm, values, ui), oauth_token, profile, progress), ui)

    def start_merge() -> dict[Any, Any]:
        """Runs first (unqueued): clear the old results and lock both buttons while a merge runs."""
        cleared = MergeView(state=KEEP, error=NO_ERROR, table=_table(None), repo_name=KEEP,
                            push_btn=gr.update(interactive=False), merge_btn=gr.update(interactive=False))
        return {**_updates(cleared, ui), ui["push_result"]: gr.update(value="", visible=False)}

    def start_push() -> dict[Any, Any]:
        """Runs first (unqueued): lock both buttons; the result box shows the upload's progress."""
        locked = gr.update(interactive=False)
        return _updates(PushView(gr.update(value="Pushing …", visible=True), NO_ERROR, locked, locked), ui)

    merge_outputs = [ui[name] for name in _names(MergeView)]
    ui["merge_btn"].click(start_merge, None, [*merge_outputs, ui["push_result"]], queue=False,
                          show_progress="hidden").then(
        on_merge, {ui[name] for name in _names(MergeForm)}, merge_outputs, show_progress_on=[ui["verdict"]])
    push_outputs = [ui[name] for name in _names(PushView)]
    ui["push_btn"].click(start_push, None, push_outputs, queue=False, show_progress="hidden").then(
        on_push, {ui[name] for name in _names(PushForm)}, push_outputs, show_progress_on=[ui["push_result"]])


def build_demo() -> gr.Blocks:
    sweep_workdirs()  # folders of merges whose process died (a restart, an out-of-memory kill)
    ui: dict[str, Any] = {}
    with gr.Blocks(title="LoRA Merge Space") as demo:
        gr.Markdown(
            "# LoRA Merge Space\n"
            "Merge a LoRA adapter into its base model (W' = W + scale · B @ A, streamed shard by shard), "
            "verify the result against the base and the adapter, and push it to the Hub."
        )
        _form_section(ui, _demo_prompts())
        _results_section(ui)
        _push_section(ui)
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
    demo.queue(default_concurrency_limit=2)
    return demo


demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
