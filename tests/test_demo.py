"""The bundled demo is reproducible by its script, and the adapter visibly changes the base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_make_demo_rebuilds_a_demo_where_the_adapter_shows(tmp: Path) -> None:
    proc = subprocess.run([sys.executable, "scripts/make_demo.py", str(tmp / "demo")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    bases = [line.split(":", 1)[1] for line in lines if line.strip().startswith("base:")]
    adapters = [line.split(":", 1)[1] for line in lines if line.strip().startswith("adapter:")]
    assert len(bases) == len(adapters) == 3
    assert all("arr" in a and "arr" not in b for a, b in zip(adapters, bases))
    size = sum(p.stat().st_size for p in (tmp / "demo").rglob("*") if p.is_file())
    assert size < 6_000_000
    assert json.loads((tmp / "demo" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "demo/base"


def test_bundled_demo_is_committed_and_complete() -> None:
    for name in ("base/config.json", "base/model.safetensors", "base/tokenizer.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "prompts.json"):
        assert (ROOT / "demo" / name).is_file(), name
