"""Layer-streamed function rows: same numbers as the in-memory rows, faults caught, one layer held at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.layer_stream import streamed_logit_checks, streamed_models
from merge_core.merge import merge_adapter
from merge_core.options import MergeOptions
from merge_core.plan import build_plan
from merge_core.tasks import LOGIT_ROWS, probe_inputs, three_ways
from merge_core.verify_function import functional_checks
from tests.factories import make_adapter, make_base

CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "llama-saved-head": ("llama", {"modules_to_save": ["lm_head", "embed_tokens"]}),
    "qwen2-tied-saved-head": ("qwen2", {"modules_to_save": ["lm_head", "embed_tokens"]}),
}


def merged_case(tmp: Path, arch: str, *, layers: int = 2, shard: str | None = None, **lora: object):
    base = make_base(tmp / "base", arch, layers=layers, max_shard_size=shard)
    adapter = make_adapter(base, tmp / "adapter", **lora)
    merge_adapter(base, adapter, tmp / "merged", MergeOptions())
    return build_plan(base, adapter, MergeOptions()), tmp / "merged"


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_rows_equal_the_in_memory_rows(tmp_path: Path, case: str) -> None:
    arch, lora = CASES[case]
    plan, merged = merged_case(tmp_path, arch, **lora)
    streamed = streamed_logit_checks(plan, merged)
    in_memory = functional_checks(plan, merged, force=True)
    assert [r.name for r in streamed] == [r.name for r in in_memory] == LOGIT_ROWS
    for got, want in zip(streamed, in_memory, strict=True):
        if got.name == LOGIT_ROWS[2]:  # greedy decoding needs the whole model: said, not run
            assert got.passed is None and "whole model" in got.detail
            continue
        assert got.passed is True and want.passed is True, (got, want)
        assert float(got.value.rstrip("%")) == pytest.approx(float(want.value.rstrip("%")), abs=1e-5)


def test_streamed_logits_equal_peft_model_within_1e_5(tmp_path: Path) -> None:
    from tests.factories import peft_reference

    plan, merged = merged_case(tmp_path, "llama", modules_to_save=["lm_head"])
    reference = peft_reference(tmp_path / "base", tmp_path / "adapter")
    with streamed_models(plan, merged) as (models, _):
        inputs = probe_inputs(models)
        streamed_ref, streamed_merged, _base = (o.logits for o in three_ways(models, inputs))
    with torch.no_grad():
        want = reference(**inputs).logits
    assert float((streamed_ref - want).abs().max()) <= 1e-5
    assert float((streamed_merged - want).abs().max()) <= 1e-4


def test_a_scaled_merged_tensor_fails_the_logits_row(tmp_path: Path) -> None:
    plan, merged = merged_case(tmp_path, "llama")
    file = merged / "model.safetensors"
    state = load_file(file)
    state["model.layers.1.mlp.down_proj.weight"] *= 1.5
    save_file(state, file, metadata={"format": "pt"})
    rows = {r.name: r for r in streamed_logit_checks(plan, merged)}
    assert rows[LOGIT_ROWS[0]].passed is False
    assert float(rows[LOGIT_ROWS[0]].value) > 1e-2


def test_a_missing_merged_tensor_is_a_failed_row(tmp_path: Path) -> None:
    plan, merged = merged_case(tmp_path, "llama")
    file = merged / "model.safetensors"
    state = load_file(file)
    del state["model.layers.0.self_attn.o_proj.weight"]
    save_file(state, file, metadata={"format": "pt"})
    rows = functional_checks(plan, merged, memory_budget=1000)
    assert rows[0].passed is False and "o_proj" in rows[0].detail


def test_over_the_memory_budget_the_rows_are_streamed_not_skipped(tmp_path: Path) -> None:
    plan, merged = merged_case(tmp_path, "qwen2")
    rows = {r.name: r for r in functional_checks(plan, merged, memory_budget=1000)}
    assert list(rows) == LOGIT_ROWS
    assert "layer by layer" in rows[LOGIT_ROWS[0]].detail
    assert all(rows[n].passed is True for n in (LOGIT_ROWS[0], LOGIT_ROWS[1], LOGIT_ROWS[3]))
    greedy = rows[LOGIT_ROWS[2]]
    assert greedy.passed is None and "GB" in greedy.detail and "whole model" in greedy.detail


def _materialised(*models: torch.nn.Module) -> int:
    """Base/merged weights held right now: real parameters that are not the adapter's own."""
    return sum(
        p.numel()
        for m in models
        for n, p in m.named_parameters()
        if not p.is_meta and "lora_" not in n and "modules_to_save" not in n
    )


def test_at_most_one_layer_is_held_at_a_time(tmp_path: Path) -> None:
    plan, merged = merged_case(tmp_path, "llama", layers=8, shard="100KB")
    assert len(plan.base.shards) > 2  # layers come from several files
    peak = 0
    with streamed_models(plan, merged) as (models, stats):
        roots = (models.peft, models.merged)
        layer = sum(p.numel() for p in models.merged.model.layers[0].parameters())
        whole = sum(p.numel() for p in models.merged.parameters())

        def measure(_module: torch.nn.Module, _args: object, _out: object) -> None:
            nonlocal peak
            peak = max(peak, _materialised(*roots))

        handle = torch.nn.modules.module.register_module_forward_hook(measure)
        try:
            three_ways(models, probe_inputs(models))
        finally:
            handle.remove()
        assert _materialised(*roots) == 0  # everything went back to the meta device
    assert 0 < peak <= layer < whole / 8
    assert stats.peak == peak and stats.units == 8 + 3  # 8 layers, embedding, final norm, head


def test_a_model_that_cannot_be_streamed_gets_skipped_rows_that_say_why(tmp_path: Path) -> None:
    # Training resized the vocabulary: the reference needs resize_token_embeddings, which a skeleton cannot redo.
    lora = {"resize_vocab": 104, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}
    plan, merged = merged_case(tmp_path, "llama", **lora)
    rows = functional_checks(plan, merged, memory_budget=1000)
    assert [r.name for r in rows] == LOGIT_ROWS
    assert all(r.passed is None and "GB" in r.detail and "vocabulary" in r.detail for r in rows), rows


def test_layer_runs_advance_as_shards_appear_and_give_the_whole_folder_rows(tmp_path: Path) -> None:
    from itertools import zip_longest

    from merge_core.checkpoint import BaseTensor
    from merge_core.layer_stream import DiskView, streamed_runs
    from merge_core.safetensors_io import read_header

    base = make_base(tmp_path / "base", "llama", layers=4, max_shard_size="60KB")
    adapter = make_adapter(base, tmp_path / "adapter")
    merged, options = tmp_path / "merged", MergeOptions(max_shard_size="40KB")
    merge_adapter(base, adapter, merged, options)
    plan = build_plan(base, adapter, options)
    base_shards = sorted({Path(t.shard) for t in plan.base.tensors.values()})
    merged_shards = sorted(merged.glob("model-*.safetensors"))
    assert len(base_shards) > 2 and len(merged_shards) > 2
    view = DiskView(plan.base.tensors, {})
    ran: list[int] = []
    with streamed_runs(plan, view, merged) as runs:
        assert not runs.advance()  # nothing on disk: every forward waits before its first unit
        for base, out in zip_longest(base_shards, merged_shards):
            if base is not None:
                view.base_present.add(base)
            if out is not None:
                view.merged.update({n: BaseTensor(out, i) for n, i in read_header(out).tensors.items()})
                view.merged_present.add(out)
            done = runs.advance()
            ran.append(sum(len(p.outputs) for p in runs.passes))
            assert runs.stats.held == 0  # a paused forward holds no weights
        rows = runs.rows()
        assert done and 0 < ran[0] < ran[-1] and ran == sorted(ran)  # advanced shard by shard, never back
    whole = streamed_logit_checks(plan, merged)
    assert [(r.name, r.passed, r.value) for r in rows] == [(r.name, r.passed, r.value) for r in whole]
