"""Merged vs separate, measured: generation throughput and first-token latency of base + adapter (PEFT,
unmerged) and of the merged model, on the same prompt and settings, with a warm-up and repeated runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model_lock import building_models
from .models import placement


@dataclass
class Timing:
    """One way of serving the model: its load time and each measured run."""

    load_s: float
    tokens_per_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)

    @staticmethod
    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


@dataclass
class SpeedComparison:
    separate: Timing  # base + adapter, PEFT unmerged
    merged: Timing
    separate_bytes: int  # base + adapter on disk
    merged_bytes: int
    runs: int
    new_tokens: int
    device: str

    def differs(self, values: Callable[[Timing], list[float]]) -> bool:
        """Measurably different only when the runs' ranges do not overlap."""
        a, b = values(self.separate), values(self.merged)
        return max(a) < min(b) or max(b) < min(a)

    def verdict(self) -> str:
        """One honest line: a difference only where the runs' ranges do not overlap."""
        if not self.differs(lambda t: t.tokens_per_s):
            return "no measurable difference in throughput (within the runs' spread)"
        ratio = statistics.median(self.merged.tokens_per_s) / statistics.median(self.separate.tokens_per_s)
        return f"merged generates {abs(ratio - 1):.0%} {'faster' if ratio > 1 else 'slower'} than base + adapter"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@torch.no_grad()
def _time_runs(model: Any, enc: dict[str, Any], *, new_tokens: int, runs: int, pad_token_id: Any) -> Timing:
    timing = Timing(load_s=0.0)

    def generate(n: int) -> float:
        started = time.perf_counter()
        model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id)
        return time.perf_counter() - started

    generate(new_tokens)  # warm-up: first-call allocations and kernel choices are not the model's speed
    for _ in range(runs):
        timing.first_token_s.append(generate(1))
        timing.tokens_per_s.append(new_tokens / generate(new_tokens))
    return timing


def measure(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, *, prompt: str, new_tokens: int = 32, runs: int = 3,
    device: str = "cpu",
) -> SpeedComparison:  # fmt: skip
    """Load each way in turn (timed), then warm-up and ``runs`` greedy generations of exactly ``new_tokens``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    enc = {k: v.to(device) for k, v in tok(prompt, return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = {"new_tokens": new_tokens, "runs": runs, "pad_token_id": pad}

    placed = placement(device)
    started = time.perf_counter()
    with building_models():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto", **placed)
        separate = PeftModel.from_pretrained(base, adapter_dir).to(device).eval()
    del base
    load_s = time.perf_counter() - started
    separate_timing = _time_runs(separate, enc, **kwargs)
    separate_timing.load_s = load_s
    del separate

    started = time.perf_counter()
    with building_models():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto", **placed).to(device).eval()
    load_s = time.perf_counter() - started
    merged_timing = _time_runs(merged, enc, **kwargs)
    merged_timing.load_s = load_s
    del merged
    return SpeedComparison(
        separate=separate_timing,
        merged=merged_timing,
        separate_bytes=_folder_bytes(base_dir) + _folder_bytes(adapter_dir),
        merged_bytes=_folder_bytes(merged_dir),
        runs=runs,
        new_tokens=new_tokens,
        device=device,
    )


__all__ = ["SpeedComparison", "Timing", "measure"]
