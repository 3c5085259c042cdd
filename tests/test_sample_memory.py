"""Sample generation and model size: the load decision (GPU straight from safetensors, or not at all when the
models do not fit) and what the page says instead of a sample; never a crash for size."""

from __future__ import annotations

from pathlib import Path

from merge_core.frontend import MergeView
from merge_core.generate import GenerationSettings
from merge_core.models import memory_fit, models_bytes
from merge_core.pipeline import MergeRequest, add_model_checks, model_checks, run_merge
from tests.factories import make_adapter, make_base, make_tokenizer

GB = 10**9


def test_the_load_decision_is_a_pure_function_of_size_and_free_memory() -> None:
    seven_b = models_bytes(7 * GB, 40_000_000)  # two float32 copies of a 7B model, each with its adapter
    assert 56 * GB < seven_b < 57 * GB

    gpu = memory_fit(seven_b, device="cuda", free=80 * GB)  # an H100 / a ZeroGPU slice: loads on the GPU
    assert gpu.fits and gpu.device_map == "cuda" and gpu.required > seven_b
    small_gpu = memory_fit(seven_b, device="cuda:0", free=40 * GB)
    assert not small_gpu.fits and small_gpu.device_map == "cuda"
    assert small_gpu.sentence().startswith("needs about 70.8 GB of memory") and "the GPU has 40.0 GB free" in (
        small_gpu.sentence()
    )

    cpu = memory_fit(seven_b, device="cpu", free=16 * GB)  # a free CPU Space: 16 GB of RAM
    assert not cpu.fits and cpu.device_map is None  # on CPU transformers loads as usual (no device_map)
    assert "needs about 94.4 GB of memory" in cpu.sentence() and "this machine has 16.0 GB free" in cpu.sentence()
    assert memory_fit(models_bytes(100_000_000, 0), device="cpu", free=16 * GB).fits  # a 100M model fits


def test_models_too_large_for_memory_give_the_sizes_not_a_sample_and_the_merge_stands(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", "llama")
    make_tokenizer(base)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    result = run_merge(MergeRequest(adapter=str(adapter)), tmp_path / "work")
    settings = GenerationSettings("w5 w6 w7", max_new_tokens=4)

    # An injected 300 MB of free memory: the tiny models plus the loading overhead do not fit.
    small = model_checks(
        result.base_dir, result.adapter_dir, result.output_dir, settings, device="cpu", memory_budget=300_000_000
    )
    assert small.sample is None and "this machine has 0.3 GB free" in small.sample_skipped
    assert small.sample_skipped.startswith("needs about 0.9 GB of memory")
    add_model_checks(result, small)
    assert result.verification.passed, result.verification.to_text()  # the logit rows ran layer by layer
    assert any(c.group == "function" and c.passed for c in result.verification.checks)
    view = MergeView.of_result(result, settings.prompt)
    assert view.gen_note == f"No sample generation: the models {small.sample_skipped}."
    assert view.gen_merged == view.gen_adapter == view.gen_base == ""

    # With this machine's real free memory the same merge samples (and the note is gone).
    fits = model_checks(result.base_dir, result.adapter_dir, result.output_dir, settings, device="cpu")
    assert fits.sample is not None and fits.sample_skipped == "" and fits.sample.merged_equals_adapter
    add_model_checks(result, fits)
    assert "No sample" not in MergeView.of_result(result, settings.prompt).gen_note
    result.release()
