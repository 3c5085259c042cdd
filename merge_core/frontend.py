"""What a front end (the Gradio app) shows and allows, free of any UI toolkit: request limits,
one merge at a time per session, progress text and the result summaries in Markdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .errors import InvalidOptionError
from .progress import ProgressCallback, ProgressUpdate
from .verify import VerificationReport

if TYPE_CHECKING:
    from .pipeline import MergeResult

STAGES = {"resolve": "Resolving inputs", "merge": "Merging", "verify": "Verifying", "upload": "Uploading"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a shared Space; each refusal states its limit."""

    prompt_chars: int = 2_000
    max_new_tokens: int = 256
    field_chars: int = 1_000  # adapter list, base, revisions, shard size, repo name
    merges_per_session: int = 1


LIMITS = Limits()
_running: dict[str, int] = {}  # session -> merges in flight
_running_lock = threading.Lock()


@contextmanager
def session_slot(session: Optional[str], limits: Limits = LIMITS) -> Iterator[None]:
    """At most ``limits.merges_per_session`` merges of one session at a time (a second click
    while one runs would hold a second model on the disk and the CPU); no session: no limit."""
    key = session or ""
    with _running_lock:
        if session and _running.get(key, 0) >= limits.merges_per_session:
            raise SessionBusyError(f"A merge is already running in this session (limit: {limits.merges_per_session} "
                                   "at a time); wait for it to finish, then merge again.")
        _running[key] = _running.get(key, 0) + 1
    try:
        yield
    finally:
        with _running_lock:
            _running[key] -= 1
            if not _running[key]:
                del _running[key]


class SessionBusyError(InvalidOptionError):
    """The session already runs as many merges as it may."""


def check_limits(*, prompt: str, max_new_tokens: float, fields: dict[str, str], limits: Limits = LIMITS) -> None:
    """Refuse a request over a limit, naming the limit (InvalidOptionError)."""
    if len(prompt or "") > limits.prompt_chars:
        raise InvalidOptionError(f"The prompt has {len(prompt):,} characters; the limit is {limits.prompt_chars:,}. "
                                 "Shorten it.")
    tokens = int(max_new_tokens or 0)
    if not 1 <= tokens <= limits.max_new_tokens:
        raise InvalidOptionError(f"Max new tokens is {tokens}; choose between 1 and {limits.max_new_tokens}.")
    for label, value in fields.items():
        if len(value or "") > limits.field_chars:
            raise InvalidOptionError(f"The field '{label}' has {len(value):,} characters; the limit is "
                                     f"{limits.field_chars:,}. Enter a Hub ID like owner/name.")


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
    return f"{int(n)}{(' ' + unit) if unit else ''}"


def progress_adapter(progress: Callable[..., Any]) -> ProgressCallback:
    """merge_core's ProgressUpdate -> a ``progress(fraction, desc=...)`` display (gr.Progress),
    throttled to a few updates a second."""
    last: dict[str, Any] = {"t": 0.0, "stage": None}

    def callback(update: ProgressUpdate) -> None:
        now = time.monotonic()
        final = update.total is not None and update.done >= update.total
        if update.stage == last["stage"] and not final and now - last["t"] < 0.25:
            return
        last.update(t=now, stage=update.stage)
        desc = f"{STAGES.get(update.stage, update.stage[:1].upper() + update.stage[1:])} …"
        if update.total:
            desc += f" {_amount(update.done, update.unit)} / {_amount(update.total, update.unit)}"
        if update.message:
            desc += f" ({update.message})"
        fraction = update.fraction
        try:
            progress(fraction if fraction is not None else (int(update.done), None), desc=desc)
        except Exception:  # noqa: BLE001 - progress display must never break a merge
            pass

    return callback


def verdict_markdown(report: VerificationReport) -> str:
    failed = report.failed()
    skipped = [c for c in report.checks if c.passed is None]
    if failed:
        plural = "s" if len(failed) != 1 else ""
        return f"### ❌ {len(failed)} check{plural} failed: " + ", ".join(c.name for c in failed)
    text = f"### ✅ All {len(report.checks) - len(skipped)} checks passed"
    if skipped:
        text += f" ({len(skipped)} skipped, reason in the table)"
    return text


def _num(x: float) -> str:  # 3 significant digits, never scientific notation
    return f"{x:,.2f}" if x >= 100 else f"{float(f'{x:.3g}'):f}".rstrip("0").rstrip(".")


def sizes_markdown(result: MergeResult) -> str:
    s = result.sizes()
    return (f"**Adapter** {_num(s['adapter_mb'])} MB · **Base** {_num(s['base_gb'])} GB · "
            f"**Merged** {_num(s['merged_gb'])} GB")


def sample_note(result: MergeResult, prompt: str) -> str:
    sample = result.sample
    if sample is None:
        if not prompt.strip():
            return "No prompt given, so no sample generation."
        skipped = [c.detail for c in (result.verification.checks if result.verification else [])
                   if c.group == "function" and c.passed is None]
        return "No sample generation: " + (skipped[0] if skipped else "the merged model has no tokenizer.")
    same = ("✅ merged output is identical to base + adapter" if sample.merged_equals_adapter
            else "⚠️ merged output differs from base + adapter")
    return f"{same} · {sample.max_new_tokens} new tokens max on {sample.device} in {sample.seconds:.1f}s"


__all__ = ["LIMITS", "Limits", "SessionBusyError", "check_limits", "progress_adapter", "sample_note", "session_slot",
           "sizes_markdown", "verdict_markdown"]
