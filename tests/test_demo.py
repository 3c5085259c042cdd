"""The bundled demo: complete in the repository, and its script builds a demo where the adapter shows.

The script runs here on a short schedule (a few seconds of training instead of the bundled demo's
700 + 500 steps): the test checks what the script produces, not how well the tiny model learns.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel

from merge_core import merge_adapter
from tests.factories import load_model, logits

ROOT = Path(__file__).parents[1]
STEPS = 20  # enough for the LoRA to open every answer with its pirate greeting
FILES = (
    "base/config.json",
    "base/model.safetensors",
    "base/tokenizer.json",
    "base/README.md",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/README.md",
    "prompts.json",
)


def answers(stdout: str, who: str) -> list[str]:
    """The script's report lines ``  base:    <answer>`` (or adapter/merged), one per demo prompt."""
    return [line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.strip().startswith(f"{who}:")]


def test_make_demo_on_a_short_schedule_builds_a_demo_where_the_adapter_shows(tmp: Path) -> None:
    out = tmp / "demo"
    command = [sys.executable, "scripts/make_demo.py", "--out", str(out), "--steps", str(STEPS)]
    # About 10 s idle; the limit only catches a hang, on however busy a machine.
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    for name in FILES:
        assert (out / name).is_file(), name
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 6_000_000
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "demo/base"
    assert json.loads((out / "prompts.json").read_text()) == json.loads((ROOT / "demo" / "prompts.json").read_text())

    # The script's own report: the adapter changes every answer, and PEFT's merged model agrees with it.
    base, adapter, merged = (
        answers(proc.stdout, "base"),
        answers(proc.stdout, "adapter"),
        answers(proc.stdout, "merged"),
    )
    assert len(base) == len(adapter) == len(merged) == 3
    assert all(a.startswith("Ahoy matey") and "Ahoy" not in b for a, b in zip(adapter, base, strict=True))
    assert merged == adapter

    # The product's own merge of the built demo loads with transformers and carries the adapter.
    merge_adapter(out / "base", out / "adapter", tmp / "merged")
    ids = torch.tensor([[1, 5, 17, 42, 99, 200, 301, 7]])
    reference = PeftModel.from_pretrained(load_model(out / "base"), out / "adapter").eval()
    merged_logits, reference_logits = logits(load_model(tmp / "merged"), ids), logits(reference, ids)
    assert (merged_logits - reference_logits).abs().max().item() <= 1e-4
    assert (logits(load_model(out / "base"), ids) - reference_logits).abs().max().item() > 1e-2


def test_bundled_demo_is_committed_and_complete() -> None:
    for name in FILES:
        assert (ROOT / "demo" / name).is_file(), name
