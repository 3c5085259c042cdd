"""What a front end (the Gradio app) shows and allows, free of any UI toolkit: request limits,
one merge at a time per session, progress text and the result summaries in Markdown."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidOptionError
from .gguf_export import supported_architectures
from .progress import ProgressCallback, ProgressUpdate, eta_text
from .quant_targets import QUANT_TARGETS
from .verify import VerificationReport

if TYPE_CHECKING:
    from .pipeline import MergeRequest, MergeResult

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
def session_slot(session: str | None, limits: Limits = LIMITS) -> Iterator[None]:
    """At most ``limits.merges_per_session`` merges of one session at a time (a second click
    while one runs would hold a second model on the disk and the CPU); no session: no limit."""
    key = session or ""
    with _running_lock:
        if session and _running.get(key, 0) >= limits.merges_per_session:
            raise SessionBusyError(
                f"A merge is already running in this session (limit: {limits.merges_per_session} "
                "at a time); wait for it to finish, then merge again."
            )
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
        raise InvalidOptionError(
            f"The prompt has {len(prompt):,} characters; the limit is {limits.prompt_chars:,}. Shorten it."
        )
    tokens = int(max_new_tokens or 0)
    if not 1 <= tokens <= limits.max_new_tokens:
        raise InvalidOptionError(f"Max new tokens is {tokens}; choose between 1 and {limits.max_new_tokens}.")
    for label, value in fields.items():
        if len(value or "") > limits.field_chars:
            raise InvalidOptionError(
                f"The field '{label}' has {len(value):,} characters; the limit is "
                f"{limits.field_chars:,}. Enter a Hub ID like owner/name."
            )


DTYPES = ["auto", "float16", "bfloat16", "float32"]
PUSH_MODE_LABELS = {"Create new repo": "new", "Update existing repo": "update", "Open a pull request": "pr"}
FUNCTIONAL = {"auto (when it fits in memory)": "auto", "always": "always", "never": "never"}
GGUF_INFO = f"for llama.cpp, Ollama, LM Studio; made for {', '.join(supported_architectures())} (else a note says why)"
QUANT_INFO = "bitsandbytes/FP8 bases only. " + "; ".join(f"{k}: {v}" for k, v in QUANT_TARGETS.items())


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()  # a view field left as it is on the page


@dataclass
class MergeForm:
    """What the merge button sends; each field is the app's component of the same name."""

    # what to merge
    adapter: str = ""
    base: str = ""
    adapter_revision: str = ""
    base_revision: str = ""
    # how (Advanced)
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    functional: str = next(iter(FUNCTIONAL))
    combination: str = "stack"
    density: float | None = None
    gguf_types: list[str] = field(default_factory=list)  # made only for architectures GGUF supports
    quantized_target: str = "dequantized"  # what a quantized base becomes (merge_core.quant_targets)
    prompt: str = ""
    max_new_tokens: float = 48
    temperature: float = 0.0
    seed: float = 0
    repo_name: str = ""
    push_mode: str = "Create new repo"  # with a target repo and a token, its permission is checked first
    token: str = field(default="", repr=False)  # the pasted token; never stored, logged or returned
    state: MergeResult | None = None  # the session's previous result


@dataclass
class PushForm:
    repo_name: str = ""
    private: bool = False
    push_mode: str = "Create new repo"
    token: str = field(default="", repr=False)
    state: MergeResult | None = None


# A page after a merge starts from this: nothing shown, the repo name as the user left it.
_CLEARED: dict[str, Any] = {
    **dict.fromkeys(("state", "error", "table", "push_btn", "merge_btn")),
    **dict.fromkeys(("verdict", "gen_base", "gen_adapter", "gen_merged", "gen_note", "sizes", "summary"), ""),
    "repo_name": KEEP,
}


@dataclass
class MergeView:
    """What a merge shows, one field per component of the same name; KEEP leaves it as it is."""

    state: Any
    error: Any
    verdict: Any  # the verification: verdict line and table
    table: Any
    gen_base: Any  # the three generations side by side, and the line under them
    gen_adapter: Any
    gen_merged: Any
    gen_note: Any
    sizes: Any  # sizes and the merge summary
    summary: Any
    repo_name: Any  # the push row and the buttons this merge unlocks
    push_btn: Any
    merge_btn: Any

    @classmethod
    def cleared(cls, **changes: Any) -> MergeView:
        """Every field emptied (the repo name kept) except ``changes``."""
        return cls(**{**_CLEARED, **changes})

    @classmethod
    def kept(cls, **changes: Any) -> MergeView:
        """Every field KEEP except ``changes``."""
        return cls(**{**dict.fromkeys(field_names(cls), KEEP), **changes})

    @classmethod
    def of_result(cls, result: MergeResult, prompt: str, **changes: Any) -> MergeView:
        """The texts of a finished merge; the toolkit-specific fields come in ``changes``."""
        sample = result.sample
        texts = (sample.base, sample.adapter, sample.merged) if sample else ("", "", "")
        return cls.cleared(
            state=result,
            verdict=verdict_markdown(result.verification),
            gen_base=texts[0],
            gen_adapter=texts[1],
            gen_merged=texts[2],
            gen_note=sample_note(result, prompt or ""),
            sizes=sizes_markdown(result),
            summary=result.report.summary(),
            **changes,
        )


@dataclass
class PushView:
    """What a push shows: its result (or nothing), the error box, and both buttons."""

    push_result: Any
    error: Any
    merge_btn: Any
    push_btn: Any


def view_updates(view: Any, ui: dict[str, Any]) -> dict[Any, Any]:
    """A view as gradio's {component: value}, leaving out the fields kept as they are."""
    names = field_names(type(view))
    return {ui[name]: getattr(view, name) for name in names if getattr(view, name) is not KEEP}


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def form_from(cls: type, values: dict[Any, Any], ui: dict[str, Any]) -> Any:
    """A form dataclass built by field name out of the {component: value} dict that gradio passes."""
    return cls(**{name: values[ui[name]] for name in field_names(cls)})


def merge_request(form: MergeForm, token: str | None, local: LocalPaths) -> MergeRequest:
    """The form as a MergeRequest, refused (one sentence) when over a limit or invalid."""
    from .gguf_outputs import parse_gguf_types
    from .pipeline import MergeRequest

    check_limits(
        prompt=form.prompt,
        max_new_tokens=form.max_new_tokens,
        fields={
            "Adapter": form.adapter,
            "Base model": form.base,
            "Adapter revision": form.adapter_revision,
            "Base revision": form.base_revision,
            "Max shard size": form.max_shard_size,
            "Target repo": form.repo_name,
        },
    )
    if (form.dtype or "auto") not in DTYPES:
        raise ValueError(f"Unknown dtype {form.dtype!r}; choose one of {', '.join(DTYPES)}.")
    request = MergeRequest(
        adapter=local.adapters(form.adapter),
        base=local.source(form.base, "Base model"),
        adapter_revision=(form.adapter_revision or "").strip() or None,
        base_revision=(form.base_revision or "").strip() or None,
        dtype=form.dtype or "auto",
        max_shard_size=(form.max_shard_size or "").strip() or "5GB",
        token=token,
        functional=FUNCTIONAL.get(form.functional, form.functional or "auto"),
        combination=form.combination or "stack",
        density=float(form.density) if form.density else None,
        local_roots=local.roots,  # defence in depth: merge_core itself refuses folders outside the demo
        gguf_types=parse_gguf_types(form.gguf_types or []),
        gguf_optional=True,  # another architecture gets a note in the summary, not a refusal
        quantized_target=form.quantized_target or "dequantized",
    )
    request.options()  # a bad shard size or dtype is refused before a folder is made
    return request


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


@dataclass(frozen=True)
class LocalPaths:
    """Which local folders a public app may read: the bundled demo only (the server's own
    folders, such as the HF cache, hold other users' gated downloads), or any with allow_any."""

    demo_dir: Path
    allow_any: bool = False

    def demo_prompts(self) -> list[str]:
        try:
            prompts = json.loads((self.demo_dir / "prompts.json").read_text(encoding="utf-8"))
            return [str(p) for p in prompts if str(p).strip()]
        except (OSError, ValueError, TypeError):
            return []

    def has_demo(self) -> bool:
        return (self.demo_dir / "base").is_dir() and (self.demo_dir / "adapter").is_dir()

    @property
    def roots(self) -> list[Path] | None:
        return None if self.allow_any else [self.demo_dir]

    def source(self, text: str, what: str) -> str:
        """A Hub ID as typed, or an absolute path for the bundled demo ("demo/base"); other
        local folders are refused unless allow_any."""
        text = (text or "").strip()
        if not text:
            return ""
        rel = text.removeprefix("./")
        candidate = self.demo_dir / rel[len("demo/") :]
        if rel.startswith("demo/") and _is_dir(candidate) and _within(candidate, self.demo_dir):
            return str(candidate.resolve())
        path = Path(text).expanduser()
        looks_local = text.startswith((".", "/", "~", "\\")) or (len(text) > 1 and text[1] == ":") or _is_dir(path)
        if not looks_local:
            return text
        if self.allow_any or (_within(path, self.demo_dir) and _is_dir(path)):
            return str(path.resolve()) if _is_dir(path) else text
        raise ValueError(
            f"{what} {text!r} is a local path. This app reads models from the Hub only (plus the "
            "bundled demo, demo/base and demo/adapter): enter a Hub ID like owner/name."
        )

    def adapters(self, text: str) -> str:
        """The adapter field (one adapter, or several as "a/b, c/d:0.5"), every entry checked."""
        from .pipeline import parse_adapter_list

        entries = parse_adapter_list(text or "")
        if len(entries) == 1 and entries[0][1] == 1.0:
            return self.source(entries[0][0], "Adapter")
        return ", ".join(f"{self.source(spec, 'Adapter')}:{weight!r}" for spec, weight in entries)


# --- deep links: ?adapter=…&base=… fills the form ------------------------------------------------------

PREFILL_FIELDS = {
    "adapter": "Adapter",
    "base": "Base model",
    "adapter_revision": "Adapter revision",
    "base_revision": "Base revision",
    "dtype": "Output dtype",
}


@dataclass
class Prefill:
    """What a link's query fills in, one field per component of the same name; KEEP leaves it as it is."""

    adapter: Any = KEEP
    base: Any = KEEP
    adapter_revision: Any = KEEP
    base_revision: Any = KEEP
    dtype: Any = KEEP
    error: Any = KEEP  # the refused values, one sentence each (text; the app renders it)


def _check_prefilled(name: str, value: str, local: LocalPaths, limits: Limits) -> None:
    check_limits(prompt="", max_new_tokens=1, fields={PREFILL_FIELDS[name]: value}, limits=limits)
    if name == "adapter":
        local.adapters(value)
    elif name == "base":
        local.source(value, PREFILL_FIELDS[name])
    elif name == "dtype" and value not in DTYPES:
        raise InvalidOptionError(f"Unknown dtype {value!r}; choose one of {', '.join(DTYPES)}.")


def prefill(params: Mapping[str, str], local: LocalPaths, limits: Limits = LIMITS) -> Prefill:
    """The form as a link asks (never a merge): each value under the same limits and local-path rules
    as typed input; a refused one is left out and named in ``error``."""
    out, refused = Prefill(), []
    for name in PREFILL_FIELDS:
        value = (params.get(name) or "").strip()
        if not value:
            continue
        try:
            _check_prefilled(name, value, local, limits)
        except ValueError as exc:  # InvalidOptionError is one
            refused.append(str(exc))
            continue
        setattr(out, name, value)
    if refused:
        out.error = "Not filled in from the link: " + " ".join(refused)
    return out


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
    return f"{int(n)}{(' ' + unit) if unit else ''}"


def progress_adapter(progress: Callable[..., Any]) -> ProgressCallback:
    """merge_core's ProgressUpdate -> a ``progress(fraction, desc=...)`` display (gr.Progress),
    throttled to a few updates a second."""
    last: dict[str, Any] = {"t": 0.0, "stage": None}
    started: dict[str, float] = {}  # each stage's first update: its rate gives the ETA

    def callback(update: ProgressUpdate) -> None:
        now = time.monotonic()
        started.setdefault(update.stage, now)
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
        eta = eta_text(fraction or 0.0, now - started[update.stage]) if update.unit == "B" else ""
        desc += f" · {eta}" if eta else ""
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
    return (
        f"**Adapter** {_num(s['adapter_mb'])} MB · **Base** {_num(s['base_gb'])} GB · "
        f"**Merged** {_num(s['merged_gb'])} GB"
    )


def sample_note(result: MergeResult, prompt: str) -> str:
    sample = result.sample
    if sample is None:
        if not prompt.strip():
            return "No prompt given, so no sample generation."
        if getattr(result, "sample_skipped", ""):  # too large to load here: the sizes, not a crash
            return f"No sample generation: the models {result.sample_skipped}."
        skipped = [
            c.detail
            for c in (result.verification.checks if result.verification else [])
            if c.group == "function" and c.passed is None
        ]
        return "No sample generation: " + (skipped[0] if skipped else "the merged model has no tokenizer.")
    same = (
        "✅ merged output is identical to base + adapter"
        if sample.merged_equals_adapter
        else "⚠️ merged output differs from base + adapter"
    )
    return f"{same} · {sample.max_new_tokens} new tokens max on {sample.device} in {sample.seconds:.1f}s"
