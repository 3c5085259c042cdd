"""Model builds on the app's threads take turns: transformers sets torch's default dtype process-wide while it
builds, so a build running beside another one got layers of the other's dtype (seen in the app as a float32
input meeting bfloat16 weights during two concurrent merges)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from merge_core.merge import execute_plan
from merge_core.model_lock import building_models
from merge_core.models import load_models
from merge_core.plan import build_plan
from merge_core.speed import measure

DEMO = Path(__file__).resolve().parents[1] / "demo"


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lock") / "merged"
    execute_plan(build_plan(DEMO / "base", DEMO / "adapter"), out)
    return out


def _while_another_build_holds_the_default(work) -> tuple[object, bool]:
    """Run ``work`` on a thread while this thread 'builds' with bfloat16 as the default dtype; whether
    ``work`` had to wait for it, and its result."""
    done: dict[str, object] = {}
    with building_models():
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # what from_pretrained(dtype=bfloat16) does for its build
        worker = threading.Thread(target=lambda: done.setdefault("result", work()))
        worker.start()
        time.sleep(1.0)
        waited = worker.is_alive() and "result" not in done
        torch.set_default_dtype(before)
    worker.join(timeout=600)
    return done.get("result"), waited


def test_load_models_waits_for_another_build_and_gets_its_own_dtype(merged: Path) -> None:
    plan = build_plan(DEMO / "base", DEMO / "adapter")
    models, waited = _while_another_build_holds_the_default(lambda: load_models(plan, merged, device="cpu"))
    assert waited
    dtypes = {p.dtype for m in (models.peft, models.merged) for p in m.parameters()}
    assert dtypes == {torch.float32}


def test_the_speed_comparison_waits_for_another_build_and_runs(merged: Path) -> None:
    result, waited = _while_another_build_holds_the_default(
        lambda: measure(DEMO / "base", DEMO / "adapter", merged, prompt="Hello", new_tokens=2, runs=1)
    )
    assert waited
    assert result.separate.tokens_per_s and result.merged.tokens_per_s
