"""One progress callback type, shared by the CLI (tqdm) and the app (gr.Progress)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProgressUpdate:
    """A step of a long operation.

    ``stage`` names the operation ("download", "merge", "verify", ...). ``done``/``total``
    are in ``unit`` (bytes, tensors, ...); ``total`` is None when unknown.
    """

    stage: str
    done: float
    total: float | None
    unit: str = ""
    message: str = ""

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))


ProgressCallback = Callable[[ProgressUpdate], None]


def no_progress(_: ProgressUpdate) -> None:
    return None


def eta_text(fraction: float, elapsed: float) -> str:
    """'about 3 min left' from the share done so far and the time it took; '' before there is a rate."""
    if fraction <= 0.01 or fraction >= 1 or elapsed < 1:
        return ""
    left = elapsed * (1 - fraction) / fraction
    if left < 60:
        return f"about {left:.0f} s left"
    return f"about {left / 60:.0f} min left" if left < 3600 else f"about {left / 3600:.1f} h left"


def in_caller_context(display: Callable[..., Any]) -> Callable[..., Any]:
    """``display`` called in the context of the thread that made this, one call at a time.

    gr.Progress finds its event through context variables, which the download and upload threads
    (huggingface_hub's and the streamed push's) do not inherit: without this their updates are dropped.
    """
    context, lock = contextvars.copy_context(), threading.Lock()

    def call(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return context.run(display, *args, **kwargs)

    return call


class TqdmProgress:
    """A ProgressCallback that shows one tqdm bar per stage (used by the CLI)."""

    def __init__(self, disable: bool = False) -> None:
        self._bars: dict[str, object] = {}
        self._messages: dict[str, str] = {}
        self._disable = disable

    def __call__(self, update: ProgressUpdate) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(update.stage)
        if bar is None:
            scale = update.unit == "B"
            bar = tqdm(
                total=update.total,
                desc=update.stage,
                unit=update.unit or "it",
                unit_scale=scale,
                unit_divisor=1024 if scale else 1000,
                disable=self._disable,
                leave=True,
            )
            self._bars[update.stage] = bar
        if update.total is not None and bar.total != update.total:  # type: ignore[attr-defined]
            bar.total = update.total  # type: ignore[attr-defined]
        if update.message != self._messages.get(update.stage):
            # The message is the current state, shown at once; an empty one clears the last.
            self._messages[update.stage] = update.message
            bar.set_postfix_str(update.message, refresh=False)  # type: ignore[attr-defined]
            bar.n = update.done  # type: ignore[attr-defined]
            bar.refresh()  # type: ignore[attr-defined]
        else:
            # update(), not refresh(): tqdm redraws at most every mininterval; a merge reports every block.
            bar.update(update.done - bar.n)  # type: ignore[attr-defined]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()  # type: ignore[attr-defined]
        self._bars.clear()
        self._messages.clear()


def serialized(progress: ProgressCallback) -> ProgressCallback:
    """Download, merge and upload report from three threads; front ends (tqdm, gr.Progress) expect one at a time."""
    lock = threading.Lock()

    def call(update: ProgressUpdate) -> None:
        with lock:
            progress(update)

    return call
