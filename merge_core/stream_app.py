"""The app's "Merge straight to my Hub repo": the streamed Hub-to-Hub pipeline (merge_core.stream_push) run
from a front end, with the push settings given up front, and what its page shows. Free of any UI toolkit.

The normal flow (merge here, inspect, push) stays the default: it verifies the files and generates samples.
This mode is for models whose base + merged copy do not fit the Space's disk; the normal merge says so,
before any download, and names this mode (``disk_hint``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .disk_budget import human_bytes
from .errors import DiskBudgetError, InsufficientDiskError, InvalidOptionError
from .frontend import LocalPaths, MergeForm, MergeView, merge_request
from .jobs import push_mode_of
from .progress import ProgressCallback, ProgressUpdate, eta_text, no_progress
from .stream_push import StreamPushResult
from .verify_report import VerificationReport

STREAM_BUTTON = "Merge straight to my Hub repo"
STREAM_INFO = (
    "For models too large for this Space's disk: base shards are downloaded as needed and each merged shard "
    "is uploaded as soon as it is written, all in one commit to the target repo above. Each shard is verified "
    "while its base shards are still here (a failed check commits nothing); nothing is kept, so there is no "
    "sample generation."
)
STREAM_STAGES = ("download", "merge", "upload")


@dataclass
class StreamForm:
    """The push settings a streamed merge needs up front (the rest comes from MergeForm); each field is
    the app's component of the same name."""

    private: bool = False
    push_mode: str = "Create new repo"


@dataclass
class StreamedMerge:
    """What a streamed merge shows, as text; ``view`` makes it the page's MergeView."""

    result: StreamPushResult
    verification: VerificationReport | None  # what the streamed pipeline checked, if it checked anything
    verdict: str
    gen_note: str
    sizes: str
    summary: str
    push_result: str  # the link, the commit and the next-steps snippets

    def view(self, **changes: Any) -> MergeView:
        """The page after a streamed merge: no session result to push again (the repo holds it)."""
        return MergeView.cleared(
            state=None,
            verdict=self.verdict,
            gen_note=self.gen_note,
            sizes=self.sizes,
            summary=self.summary,
            **changes,
        )


def target_repo(typed: str, owner: str) -> str:
    """The target as typed, under the signed-in owner when it names no namespace."""
    repo = (typed or "").strip()
    if not repo:
        raise InvalidOptionError(
            f"'{STREAM_BUTTON}' pushes while it merges, so it needs the target first: fill in Target repo "
            "(owner/name) above the button."
        )
    return repo if "/" in repo or not owner else f"{owner}/{repo}"


def stream_to_hub(
    form: MergeForm,
    stream: StreamForm,
    *,
    token: str | None,
    local: LocalPaths,
    owner: str = "",
    max_disk: int | None = None,
    progress: ProgressCallback = no_progress,
    oauth_scope: str | None = None,
) -> StreamedMerge:
    """Check the form, preflight the target (token, namespace, mode) before any download, then merge and
    push in one commit through the bounded-disk pipeline; a budget it cannot fit is one sentence."""
    from .pipeline import stream_push

    request = merge_request(form, token, local)
    if not token:
        raise InvalidOptionError(f"'{STREAM_BUTTON}' writes to your Hub repo: sign in or paste a write token first.")
    repo_id = target_repo(form.repo_name, owner)
    mode = push_mode_of(stream.push_mode)
    try:
        result = stream_push(
            request,
            repo_id,
            mode=mode,
            private=bool(stream.private),
            max_disk=max_disk,
            progress=progress,
            verify=True,  # each shard checked while its base shards are still here; a failed check commits nothing
            oauth_scope=oauth_scope,
        )
    except DiskBudgetError as exc:
        raise DiskBudgetError(
            f"Even streamed, this merge needs about {human_bytes(exc.needed)} of disk (two base shards, two merged "
            f"shards and the adapter) and this Space has {human_bytes(exc.budget)} to spare; it cannot run here. "
            "Run the CLI on a machine with more disk: python -m merge_core - ADAPTER - --push OWNER/NAME.",
            needed=exc.needed,
            budget=exc.budget,
        ) from exc
    return _streamed_view(result, repo_id)


def _streamed_view(result: StreamPushResult, repo_id: str) -> StreamedMerge:
    from .frontend import verdict_markdown
    from .jobs import push_markdown

    report = result.report
    # Checked shard by shard while the base shards were still here (merge_core.verify_stream).
    verification = result.verification if result.verification is not None and result.verification.checks else None
    disk = f"peak disk {human_bytes(result.peak_disk_bytes)} of a {human_bytes(result.disk_budget)} budget"
    verdict = f"### ✅ Merged and pushed straight to {repo_id} ({disk})"
    if verification is not None:
        verdict += "\n\n" + verdict_markdown(verification)
    resumed = f"; {len(result.already_on_hub)} shard(s) were already on the Hub" if result.already_on_hub else ""
    return StreamedMerge(
        result=result,
        verification=verification,
        verdict=verdict,
        gen_note=(
            f"No sample generation: in '{STREAM_BUTTON}' mode the merged model is not kept on this Space. "
            f"Try it from the Hub with the snippets under the push result ({repo_id})."
        ),
        sizes=(
            f"**Adapter** {report.adapter_bytes / 1e6:.3g} MB · **Base** {report.base_bytes / 1e9:.3g} GB · "
            f"**Merged** {report.output_bytes / 1e9:.3g} GB · **Peak disk** {human_bytes(result.peak_disk_bytes)}"
        ),
        summary=f"{report.summary()}\n  streamed: {len(result.uploaded)} shard(s) uploaded{resumed}",
        push_result=push_markdown(result.push),
    )


def disk_hint(exc: BaseException) -> str:
    """After a normal merge refused for disk: the mode that needs only a few shards of it."""
    if isinstance(exc, InsufficientDiskError) and not isinstance(exc, DiskBudgetError):
        return (
            f" Or use '{STREAM_BUTTON}' (Push to the Hub, below): it streams shard by shard and needs only about "
            "two base shards and two merged shards of disk."
        )
    return ""


def stream_progress(progress: Callable[..., Any], clock: Callable[[], float] = time.monotonic) -> ProgressCallback:
    """Download, merge and upload run at once: one bar (their mean fraction) with each stage's bytes and an
    ETA from the overall rate, throttled to a few updates a second. ``progress`` is ``gr.Progress``-like."""
    latest: dict[str, ProgressUpdate] = {}
    state = {"start": clock(), "shown": 0.0}

    def callback(update: ProgressUpdate) -> None:
        if update.stage not in STREAM_STAGES and not latest:  # metadata first (adapter, base headers): no bytes yet
            _show(progress, 0.0, f"Resolving inputs … ({update.message})" if update.message else "Resolving inputs …")
            return
        if update.stage in STREAM_STAGES:
            latest[update.stage] = update
        now = clock()
        # The bar is full only once the commit has landed; checks and the commit keep the bytes shown so far.
        final = update.stage == "commit" and update.total is not None and update.done >= update.total
        if not final and now - state["shown"] < 0.25:
            return
        state["shown"] = now
        mean = sum((latest[s].fraction or 0.0) if s in latest else 0.0 for s in STREAM_STAGES) / 3
        fraction = 1.0 if final else min(mean, 0.99)
        parts = [_stage_text(latest[s]) for s in STREAM_STAGES if s in latest]
        if update.stage not in STREAM_STAGES:
            parts.append(f"{update.stage}: {update.message}" if update.message else update.stage)
        eta = "" if final else eta_text(fraction, now - state["start"])
        _show(progress, fraction, " · ".join(parts) + (f" · {eta}" if eta else ""))

    return callback


def _show(progress: Callable[..., Any], fraction: float, desc: str) -> None:
    try:
        progress(fraction, desc=desc)
    except Exception:  # noqa: BLE001 - a progress display must never break a merge
        pass


def _stage_text(update: ProgressUpdate) -> str:
    if update.unit == "B" and update.total:
        return f"{update.stage} {update.done / 1e9:.2f}/{update.total / 1e9:.2f} GB"
    if update.total:
        return f"{update.stage} {update.fraction or 0:.0%}"
    return update.stage
