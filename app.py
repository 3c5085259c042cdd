"""LoRA Merge Space: a thin Gradio front end over ``merge_core``.

Merge, verification, model card and push all live in ``merge_core``; this file only wires
the form to ``merge_core.pipeline``, adapts progress, keeps each session's result in a
``gr.State`` (one temp folder per merge, removed when replaced, on error and when the
session ends) and runs the forward-pass checks inside ``spaces.GPU`` (a no-op off ZeroGPU).
"""

from __future__ import annotations

import spaces  # must come before anything that initialises CUDA (ZeroGPU)

import html
import json
import logging
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import torch

from merge_core.adapter import load_adapter_config
from merge_core.combine import COMBINATION_TYPES
from merge_core.errors import MergeError
from merge_core.generate import GenerationSettings
from merge_core.hub import HubClient, RepoRef, adapter_files, parse_source
from merge_core.pipeline import (
    MergeRequest,
    MergeResult,
    ModelChecks,
    add_model_checks,
    cleanup,
    model_checks,
    parse_adapter_list,
    push_merged,
    run_merge,
    whoami_name,
)
from merge_core.progress import ProgressCallback, ProgressUpdate
from merge_core.verify import Check, VerificationReport

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
PUSH_MODES = {"Create new repo": "new", "Update existing repo": "update", "Open a pull request": "pr"}
FUNCTIONAL = {"auto (when it fits in memory)": "auto", "always": "always", "never": "never"}
STATE_TTL_SECONDS = 2 * 3600
GPU_BASE_SECONDS, GPU_SECONDS_PER_GB, GPU_MAX_SECONDS = 60, 8, 240
STAGES = {"resolve": "Resolving inputs", "merge": "Merging", "verify": "Verifying", "upload": "Uploading"}


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


def _source(text: str, what: str) -> str:
    """A Hub ID as typed, or an absolute path for the bundled demo ("demo/base"); other local
    folders are refused unless LMS_ALLOW_LOCAL_PATHS=1."""
    text = (text or "").strip()
    if not text:
        return ""
    rel = text.removeprefix("./")
    if rel.startswith("demo/") and (DEMO_DIR / rel[len("demo/"):]).is_dir():
        candidate = DEMO_DIR / rel[len("demo/"):]
        if _within(candidate, DEMO_DIR):
            return str(candidate.resolve())
    path = Path(text).expanduser()
    looks_local = text.startswith((".", "/", "~", "\\")) or (len(text) > 1 and text[1] == ":") or path.exists()
    if not looks_local:
        return text
    if ALLOW_LOCAL_PATHS or (_within(path, DEMO_DIR) and path.is_dir()):
        return str(path.resolve()) if path.exists() else text
    raise ValueError(f"{what} {text!r} is a local path. This app reads models from the Hub only (plus the bundled "
                     "demo, demo/base and demo/adapter): enter a Hub ID like owner/name.")


def _adapters(text: str) -> str:
    """The adapter field (one adapter, or several as "a/b, c/d:0.5") with every entry checked by _source."""
    entries = parse_adapter_list(text or "")
    if len(entries) == 1 and entries[0][1] == 1.0:
        return _source(entries[0][0], "Adapter")
    return ", ".join(f"{_source(spec, 'Adapter')}:{weight!r}" for spec, weight in entries)


def _declared_base(request: MergeRequest) -> None:
    """When no base is given, read the adapter's declared base here, pinned to the adapter commit
    that run_merge will use, so that an adapter cannot name a server-side folder as its base."""
    if request.base:
        return
    entries = parse_adapter_list(request.adapter)
    if len(entries) != 1:
        raise ValueError("Several adapters: enter the base model's Hub ID in 'Base model'.")
    spec, weight = entries[0]
    source = parse_source(spec, request.adapter_revision)
    if isinstance(source, RepoRef):
        client = HubClient(request.token, request.endpoint)
        sha, files = client.resolve(source)
        config_name = next(f for f in adapter_files(files, source) if f.endswith("adapter_config.json"))
        folder = client.download(source, sha, [config_name]) / source.subfolder
        request.adapter = source.repo_id + (f"/{source.subfolder}" if source.subfolder else "")
        request.adapter += f":{weight!r}" if weight != 1.0 else ""
        request.adapter_revision = sha
    else:
        folder = source
    declared = (load_adapter_config(folder).base_model_name_or_path or "").strip()
    if not declared:
        raise ValueError("The adapter does not name its base model; enter the base model's Hub ID.")
    try:
        request.base = _source(declared, "The adapter's base model")
    except ValueError:
        raise ValueError(f"The adapter's config names a local folder as its base model ({declared!r}), which this "
                         "app cannot read. Enter the base model's Hub ID in 'Base model'.") from None


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


def _progress_callback(progress: Any) -> ProgressCallback:
    """merge_core's ProgressUpdate -> gr.Progress, throttled to a few updates a second."""
    last = {"t": 0.0, "stage": None}

    def fmt(n: float, unit: str) -> str:
        if unit == "B":
            return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
        return f"{int(n)}{(' ' + unit) if unit else ''}"

    def callback(update: ProgressUpdate) -> None:
        now = time.monotonic()
        final = update.total is not None and update.done >= update.total
        if update.stage == last["stage"] and not final and now - last["t"] < 0.25:
            return
        last.update(t=now, stage=update.stage)
        label = STAGES.get(update.stage, update.stage[:1].upper() + update.stage[1:])
        desc = f"{label} …"
        if update.total:
            desc += f" {fmt(update.done, update.unit)} / {fmt(update.total, update.unit)}"
        if update.message:
            desc += f" ({update.message})"
        fraction = update.fraction
        try:
            progress(fraction if fraction is not None else (int(update.done), None), desc=desc)
        except Exception:  # noqa: BLE001 - progress display must never break a merge
            pass

    return callback


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


def _verdict(report: VerificationReport) -> str:
    failed = report.failed()
    skipped = [c for c in report.checks if c.passed is None]
    if failed:
        return f"### ❌ {len(failed)} check{'s' if len(failed) != 1 else ''} failed: " + ", ".join(c.name for c in failed)
    ran = len(report.checks) - len(skipped)
    text = f"### ✅ All {ran} checks passed"
    if skipped:
        text += f" ({len(skipped)} skipped, reason in the table)"
    return text


def _sizes(result: MergeResult) -> str:
    def num(x: float) -> str:  # 3 significant digits, never scientific notation
        return f"{x:,.2f}" if x >= 100 else f"{float(f'{x:.3g}'):f}".rstrip("0").rstrip(".")

    s = result.sizes()
    return (f"**Adapter** {num(s['adapter_mb'])} MB · **Base** {num(s['base_gb'])} GB · "
            f"**Merged** {num(s['merged_gb'])} GB")


def _sample_note(result: MergeResult, prompt: str) -> str:
    sample = result.sample
    if sample is None:
        if not prompt.strip():
            return "No prompt given, so no sample generation."
        skipped = [c.detail for c in (result.verification.checks if result.verification else [])
                   if c.group == "function" and c.passed is None]
        return "No sample generation: " + (skipped[0] if skipped else "the merged model has no tokenizer.")
    same = "✅ merged output is identical to base + adapter" if sample.merged_equals_adapter else \
        "⚠️ merged output differs from base + adapter"
    return f"{same} · {sample.max_new_tokens} new tokens max on {sample.device} in {sample.seconds:.1f}s"


# --- handlers ------------------------------------------------------------------------------------------


def discard(result: MergeResult | None) -> None:
    """gr.State delete_callback: remove a session's merge folder."""
    if isinstance(result, MergeResult):
        cleanup(result.workdir)


def start_merge() -> tuple[Any, ...]:
    """Runs first (unqueued): clear the old results and lock both buttons while a merge runs."""
    return (NO_ERROR, "", _table(None), "", "", "", "", "", "", gr.update(interactive=False),
            gr.update(value="", visible=False), gr.update(interactive=False))


def merge(
    adapter: str,
    base: str,
    adapter_revision: str,
    base_revision: str,
    dtype: str,
    max_shard_size: str,
    functional: str,
    combination: str,
    density: float | None,
    prompt: str,
    max_new_tokens: float,
    temperature: float,
    seed: float,
    repo_name: str,
    pasted_token: str,
    previous: MergeResult | None,
    oauth_token: gr.OAuthToken | None = None,
    profile: gr.OAuthProfile | None = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[Any, ...]:
    """Returns (state, error, verdict, table, gen_base, gen_adapter, gen_merged, gen_note, sizes,
    summary, repo_name, push_btn, merge_btn)."""
    previous_name = previous.suggested_repo_name if isinstance(previous, MergeResult) else None
    discard(previous)
    token = _token(pasted_token, oauth_token)
    workdir: Path | None = None

    def failure(message: str) -> tuple[Any, ...]:
        cleanup(workdir)
        return (None, _error(message), "", _table(None), "", "", "", "", "", "", gr.update(),
                gr.update(interactive=False), gr.update(interactive=True))

    try:
        request = MergeRequest(
            adapter=_adapters(adapter), base=_source(base, "Base model"),
            adapter_revision=(adapter_revision or "").strip() or None,
            base_revision=(base_revision or "").strip() or None,
            dtype=dtype or "auto", max_shard_size=(max_shard_size or "").strip() or "5GB",
            token=token, functional=FUNCTIONAL.get(functional, functional or "auto"),
            combination=combination or "stack", density=float(density) if density else None,
        )
        if request.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {request.dtype!r}; choose one of {', '.join(DTYPES)}.")
        workdir = Path(tempfile.mkdtemp(prefix="lms-"))
        # Defence in depth: merge_core itself refuses folders outside the demo, and Hub
        # downloads land in this request's folder so cleaning it frees the disk again.
        request.local_roots = None if ALLOW_LOCAL_PATHS else [DEMO_DIR]
        request.cache_dir = workdir / "hub"
        callback = _progress_callback(progress)
        progress(0, desc="Resolving inputs …")
        _declared_base(request)
        result = run_merge(request, workdir, progress=callback)

        settings = None
        if (prompt or "").strip():
            settings = GenerationSettings(prompt=prompt, max_new_tokens=int(max_new_tokens),
                                          temperature=float(temperature), seed=int(seed or 0))
        progress(0.95, desc="Forward-pass checks and sample generation …")
        try:
            checks = run_model_checks(result.base_dir, result.adapter_dir, result.output_dir, settings,
                                      result.sizes()["merged_gb"], request.functional)
        except Exception as exc:  # noqa: BLE001 - the merge stands; say why the extra checks are missing
            reason = str(exc) if isinstance(exc, (MergeError, ValueError, gr.Error)) else type(exc).__name__
            log.warning("model checks failed: %s", _scrub(traceback.format_exc(), token))
            checks = ModelChecks([Check("forward-pass checks and sample", "function", None, "-", "-",
                                        f"skipped: could not run ({_scrub(reason, token)})")], None)
        add_model_checks(result, checks)
    except (MergeError, ValueError, gr.Error) as exc:
        return failure(_scrub(str(exc), token))
    except Exception as exc:  # noqa: BLE001 - never a stack trace in the page; the app keeps serving
        log.error("merge failed: %s", _scrub(traceback.format_exc(), token))
        return failure(f"Unexpected error ({type(exc).__name__}) while merging; nothing was kept. "
                       "Please try again, or report it with the adapter and base IDs.")

    current = (repo_name or "").strip()
    new_name = gr.update()
    if not current or (previous_name and current.split("/")[-1] == previous_name):
        owner = profile.username if profile is not None else ""
        if not owner and token:
            try:
                owner = whoami_name(token)
            except Exception:  # noqa: BLE001 - without a name, push_merged adds the owner itself
                owner = ""
        new_name = f"{owner}/{result.suggested_repo_name}" if owner else result.suggested_repo_name
    sample = result.sample
    return (result, NO_ERROR, _verdict(result.verification), _table(result.verification),
            sample.base if sample else "", sample.adapter if sample else "", sample.merged if sample else "",
            _sample_note(result, prompt or ""), _sizes(result), result.report.summary(), new_name,
            gr.update(interactive=True), gr.update(interactive=True))


def start_push() -> tuple[Any, ...]:
    """Runs first (unqueued): lock both buttons; the result box shows the upload's progress."""
    return gr.update(interactive=False), gr.update(interactive=False), gr.update(value="Pushing …", visible=True), NO_ERROR


def push(
    repo_name: str,
    private: bool,
    mode: str,
    pasted_token: str,
    result: MergeResult | None,
    oauth_token: gr.OAuthToken | None = None,
    profile: gr.OAuthProfile | None = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[Any, ...]:
    """Returns (push_result, error, merge_btn, push_btn)."""
    has_result = isinstance(result, MergeResult) and result.output_dir.is_dir()
    buttons = (gr.update(interactive=True), gr.update(interactive=has_result))

    def failure(message: str) -> tuple[Any, ...]:
        return (gr.update(value="", visible=False), _error(message), *buttons)

    if not has_result:
        return failure("There is no merged model in this session (it may have expired); merge first, then push.")
    token = _token(pasted_token, oauth_token)
    if not token:
        return failure(LOGIN_HINT)
    repo_id = (repo_name or "").strip() or result.suggested_repo_name
    if "/" not in repo_id and profile is not None:
        repo_id = f"{profile.username}/{repo_id}"
    try:
        progress(0, desc=f"Uploading to {repo_id} …")
        pushed = push_merged(result, repo_id, token=token, private=bool(private),
                             mode=PUSH_MODES.get(mode, mode or "new"), progress=_progress_callback(progress))
    except (MergeError, ValueError, gr.Error) as exc:
        return failure(_scrub(str(exc), token))
    except Exception as exc:  # noqa: BLE001
        log.error("push failed: %s", _scrub(traceback.format_exc(), token))
        return failure(f"Unexpected error ({type(exc).__name__}) while pushing. Please try again.")
    lines = [f"### ✅ Pushed to [{pushed.repo_id}]({pushed.repo_url})",
             f"Commit [`{pushed.commit_oid[:10]}`]({pushed.commit_url})"]
    if pushed.pr_url:
        lines.append(f"Pull request: [{pushed.pr_url}]({pushed.pr_url})")
    return (gr.update(value="\n\n".join(lines), visible=True), NO_ERROR, *buttons)


# --- layout ------------------------------------------------------------------------------------------


def build_demo() -> gr.Blocks:
    prompts = _demo_prompts()
    with gr.Blocks(title="LoRA Merge Space") as demo:
        gr.Markdown(
            "# LoRA Merge Space\n"
            "Merge a LoRA adapter into its base model (W' = W + scale · B @ A, streamed shard by shard), "
            "verify the result against the base and the adapter, and push it to the Hub."
        )
        with gr.Row():
            if SHOW_LOGIN:
                gr.LoginButton()
            token_box = gr.Textbox(label="or paste a write token", type="password", placeholder="hf_…",
                                   elem_id="token-box", scale=2,
                                   info="Used for this request only: never stored, logged or shown.")
        with gr.Row():
            adapter_box = gr.Textbox(label="Adapter", placeholder="owner/lora-adapter (Hub ID)", elem_id="adapter-id")
            base_box = gr.Textbox(label="Base model (optional)",
                                  placeholder="empty: the adapter's base (base_model_name_or_path)", elem_id="base-id")
            dtype_box = gr.Dropdown(DTYPES, value="auto", label="Output dtype", elem_id="dtype")
        with gr.Accordion("Advanced", open=False), gr.Row():
            adapter_rev = gr.Textbox(label="Adapter revision", placeholder="main (branch, tag or commit)",
                                     elem_id="adapter-revision")
            base_rev = gr.Textbox(label="Base revision", placeholder="main (branch, tag or commit)",
                                  elem_id="base-revision")
            shard_box = gr.Textbox(label="Max shard size", value="5GB", elem_id="shard-size")
            functional_box = gr.Dropdown(list(FUNCTIONAL), value=next(iter(FUNCTIONAL)),
                                         label="Logits check vs PeftModel", elem_id="functional")
            combination_box = gr.Dropdown(list(COMBINATION_TYPES), value="stack", elem_id="combination",
                                          label="Several adapters (a/x, b/y:0.5): combine as",
                                          info="stack = sum of weighted deltas; others: PEFT add_weighted_adapter")
            density_box = gr.Number(value=None, label="density (ties/dare/magnitude_prune)", elem_id="density")
        if _has_demo():
            gr.Examples([["demo/adapter", "demo/base"]], inputs=[adapter_box, base_box],
                        label="Bundled offline demo (tiny Llama + LoRA)")
        with gr.Accordion("Sample generation", open=True):
            prompt_box = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    value=prompts[0] if prompts else "Explain LoRA in one sentence.")
            with gr.Row():
                max_new = gr.Slider(1, 256, value=48, step=1, label="Max new tokens", elem_id="max-new-tokens")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
            if len(prompts) > 1:
                gr.Examples([[p] for p in prompts], inputs=[prompt_box], label="Example prompts")
        merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
        error_box = gr.Markdown(visible=False, elem_id="error-box")

        verdict = gr.Markdown(elem_id="verdict")
        table = gr.Dataframe(value=_table(None), headers=VerificationReport.HEADERS, label="Verification",
                             interactive=False, wrap=True, max_height=1400, elem_id="verify-table",
                             column_widths=["9%", "24%", "24%", "17%", "7%", "19%"])
        with gr.Row():
            gen_base = gr.Textbox(label="Base model alone", lines=4, interactive=False, elem_id="gen-base")
            gen_adapter = gr.Textbox(label="Base + adapter (PEFT, unmerged)", lines=4, interactive=False,
                                     elem_id="gen-adapter")
            gen_merged = gr.Textbox(label="Merged model", lines=4, interactive=False, elem_id="gen-merged")
        gen_note = gr.Markdown(elem_id="gen-note")
        sizes = gr.Markdown(elem_id="sizes")
        with gr.Accordion("Merge summary", open=False):
            summary = gr.Textbox(label="Summary", lines=8, interactive=False, elem_id="summary")

        gr.Markdown("## Push to the Hub")
        with gr.Row():
            repo_box = gr.Textbox(label="Target repo", placeholder="you/model-merged (filled in after the merge)",
                                  elem_id="repo-name", scale=2)
            private_box = gr.Checkbox(label="Private", value=False, elem_id="private")
            mode_box = gr.Radio(list(PUSH_MODES), value="Create new repo", label="Push mode", elem_id="push-mode")
        push_btn = gr.Button("Push to Hub", interactive=False, elem_id="push-btn")
        push_result = gr.Markdown(visible=False, elem_id="push-result")

        job = gr.State(None, time_to_live=STATE_TTL_SECONDS, delete_callback=discard)

        results = [error_box, verdict, table, gen_base, gen_adapter, gen_merged, gen_note, sizes, summary]
        merge_btn.click(start_merge, None, [*results, push_btn, push_result, merge_btn], queue=False,
                        show_progress="hidden").then(
            merge,
            [adapter_box, base_box, adapter_rev, base_rev, dtype_box, shard_box, functional_box, combination_box,
             density_box, prompt_box, max_new,
             temperature, seed, repo_box, token_box, job],
            [job, *results, repo_box, push_btn, merge_btn],
            show_progress_on=[verdict],
        )
        push_btn.click(start_push, None, [merge_btn, push_btn, push_result, error_box], queue=False,
                       show_progress="hidden").then(
            push, [repo_box, private_box, mode_box, token_box, job], [push_result, error_box, merge_btn, push_btn],
            show_progress_on=[push_result],
        )

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
