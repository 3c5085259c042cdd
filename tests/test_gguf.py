"""GGUF export: each supported architecture and type read back by transformers equals the merged model."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest

from merge_core.errors import GgufError, GgufTokenizerError, GgufUnsupportedError, MergeError
from merge_core.gguf_export import GGUF_TYPES, export_gguf, preflight_gguf, supported_architectures, verify_gguf
from merge_core.gguf_export import export as export_module
from merge_core.gguf_export import vocab as vocab_module
from merge_core.gguf_export.verify import LOGIT_THRESHOLDS
from tests.gguf_models import make_merged_folder

# (architecture, tied embeddings, sentencepiece-style tokenizer): both tokenizer kinds, tied and untied
CASES = [
    ("llama", False, False),
    ("llama", True, True),
    ("mistral", False, True),
    ("qwen2", True, False),
    ("qwen3", False, False),
    ("gemma2", True, False),
    ("gemma3_text", True, False),
    ("phi3", False, False),
]
TYPES = ["F32", "F16", "Q8_0"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict:
    """One merged folder per case, built once for the module."""
    root = tmp_path_factory.mktemp("gguf")
    return {
        case: make_merged_folder(root / "-".join(map(str, case)), case[0], tie=case[1], sentencepiece=case[2])
        for case in CASES
    }


def _rows(merged_dir: Path, out: Path, qtype: str) -> dict:
    export_gguf(merged_dir, out, qtype=qtype)
    return {c.name.split(" (")[0]: c for c in verify_gguf(merged_dir, out, qtype=qtype)}


def test_every_architecture_is_covered() -> None:
    assert sorted({case[0] for case in CASES}) == supported_architectures()
    assert set(LOGIT_THRESHOLDS) == set(GGUF_TYPES)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-{'tied' if c[1] else 'untied'}-{'spm' if c[2] else 'bpe'}"
)
@pytest.mark.parametrize("qtype", TYPES)
def test_export_reads_back_equal(merged, tmp_path: Path, case, qtype: str) -> None:
    rows = _rows(merged[case], tmp_path / f"model-{qtype}.gguf", qtype)
    assert all(row.passed for row in rows.values()), {k: (r.value, r.detail) for k, r in rows.items()}
    if qtype == "F32":
        # exact: the same float32 numbers reach the same float32 graph (Gemma's 1 + w round-trips exactly too)
        assert rows["gguf logits"].value.startswith("0.000% (max |diff| 0)")


def test_bf16(merged, tmp_path: Path) -> None:
    rows = _rows(merged[CASES[0]], tmp_path / "model-BF16.gguf", "BF16")
    assert all(row.passed for row in rows.values())
    assert "max |diff| 0)" not in rows["gguf logits"].value  # rounded weights: not trivially equal


def test_tied_embeddings_omit_output_weight(merged, tmp_path: Path) -> None:
    from gguf import GGUFReader

    for case, expected in ((CASES[0], True), (CASES[1], False)):
        export_gguf(merged[case], tmp_path / "m.gguf", qtype="F16")
        names = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
        assert ("output.weight" in names) is expected


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_wrong_qk_permutation_is_caught(merged, tmp_path: Path, monkeypatch, qtype: str) -> None:
    monkeypatch.setattr(export_module, "permute_qk", lambda weights, n_head, n_head_kv: weights)
    rows = _rows(merged[CASES[0]], tmp_path / "m.gguf", qtype)
    assert rows["gguf logits"].passed is False
    assert float(rows["gguf logits"].value.split("%")[0]) > 3 * 100 * LOGIT_THRESHOLDS[qtype]
    assert rows["gguf metadata"].passed and rows["gguf token ids"].passed


def test_wrong_pre_tokenizer_name_is_caught(merged, tmp_path: Path, monkeypatch) -> None:
    # Qwen2's rule splits digits one by one where the tokenizer's (Llama 3's) keeps runs of three
    monkeypatch.setattr(vocab_module, "byte_level_pre_name", lambda pre_tokenizer: "qwen2")
    rows = _rows(merged[CASES[0]], tmp_path / "m.gguf", "F32")
    assert rows["gguf token ids"].passed is False
    assert "first differing" in rows["gguf token ids"].detail
    assert rows["gguf logits"].passed


def test_unreadable_file_gives_one_short_line(merged, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    rows = verify_gguf(merged[CASES[0]], broken, qtype="F32")
    assert [row.passed for row in rows] == [False, False, False]
    assert all("\n" not in row.detail and len(row.detail) < 240 for row in rows)


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    from tests.factories import make_base

    make_base(tmp_path / "gpt2", "gpt2")
    with pytest.raises(GgufUnsupportedError, match=r"'gpt2'.*supported: gemma2, gemma3_text, llama") as info:
        export_gguf(tmp_path / "gpt2", tmp_path / "m.gguf", qtype="F16")
    assert isinstance(info.value, MergeError) and str(info.value).count(".") == 1
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_type_is_refused(merged, tmp_path: Path) -> None:
    with pytest.raises(GgufUnsupportedError, match="Q4_K.*F32, F16, BF16, Q8_0"):
        export_gguf(merged[CASES[0]], tmp_path / "m.gguf", qtype="Q4_K")


def test_unnamed_split_rule_is_refused(merged, tmp_path: Path) -> None:
    folder = shutil.copytree(merged[CASES[0]], tmp_path / "copy")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(GgufTokenizerError, match="split rule"):
        export_gguf(folder, tmp_path / "m.gguf", qtype="F16")


def _with_rope(folder: Path, rope: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    (folder / "config.json").write_text(json.dumps(config))


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = make_merged_folder(tmp_path / "m", "llama", tie=False)
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    _with_rope(folder, rope)
    export_gguf(folder, tmp_path / "m.gguf", qtype="F16")
    freqs = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}["rope_freqs.weight"].data
    # llama.cpp divides the plain rope frequencies by rope_freqs: that must give transformers' llama3 frequencies
    config = AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / (10000.0 ** (np.arange(0, 16, 2, dtype=np.float32) / 16))
    np.testing.assert_allclose(plain / freqs, scaled.numpy(), rtol=1e-5)
    assert freqs.min() == 1.0 and freqs.max() == 8.0  # both ends of the ramp occur at this context
    rows = {c.name.split(" (")[0]: c for c in verify_gguf(folder, tmp_path / "m.gguf", qtype="F16")}
    assert rows["gguf logits"].passed is None and "rope scaling" in rows["gguf logits"].detail
    assert rows["gguf metadata"].passed


def test_other_rope_scaling_is_refused(tmp_path: Path) -> None:
    folder = make_merged_folder(tmp_path / "m", "qwen2", tie=True)
    _with_rope(folder, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    with pytest.raises(GgufUnsupportedError, match="'yarn'"):
        export_gguf(folder, tmp_path / "m.gguf", qtype="F16")


def test_tensors_are_streamed_one_at_a_time(tmp_path: Path) -> None:
    """While tensors are written, numpy memory (what tracemalloc sees: permuted and quantized copies) stays flat.

    The peak is reset after the first tensor, so it covers the data phase only (gguf-py's name map, built
    once beforehand, is transient and has nothing to do with tensor sizes).
    """
    folder = make_merged_folder(tmp_path / "deep", "llama", tie=False, layers=40)
    baseline: list[int] = []

    def after_tensor(update) -> None:
        if not baseline:
            baseline.append(tracemalloc.get_traced_memory()[0])
            tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        report = export_gguf(folder, tmp_path / "m.gguf", qtype="Q8_0", progress=after_tensor)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest = 512 * 64 * 4  # the float32 embedding matrix
    assert report.bytes_written > 8 * largest  # what holding every tensor would add
    assert peak - baseline[0] < 2 * largest, peak - baseline[0]


def test_folder_named_mistral_still_reads_back(merged, tmp_path: Path) -> None:
    # transformers 5.24 re-labels a Llama-architecture file whose general.name is exactly "mistral", then fails
    folder = shutil.copytree(merged[("mistral", False, True)], tmp_path / "mistral")
    rows = _rows(folder, tmp_path / "m.gguf", "F16")
    assert all(row.passed for row in rows.values())


def test_write_failure_is_one_sentence(merged, tmp_path: Path) -> None:
    with pytest.raises(GgufError, match=r"^Could not write .*missing.*\.$") as info:
        export_gguf(merged[CASES[0]], tmp_path / "missing" / "m.gguf", qtype="F16")
    assert "\n" not in str(info.value)
    assert not list(tmp_path.rglob("*.partial"))


def test_gemma_query_scale_llama_cpp_cannot_keep_is_refused(merged, tmp_path: Path) -> None:
    folder = shutil.copytree(merged[("gemma2", True, False)], tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    config["query_pre_attn_scalar"] = 144
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GgufUnsupportedError, match="query_pre_attn_scalar=144"):
        export_gguf(folder, tmp_path / "m.gguf", qtype="F16")


def test_f16_straight_from_bfloat16_rounds_like_numpy_through_float32() -> None:
    """The exporter converts bfloat16 shards to F16 in torch, skipping the float32 copy: same bits."""
    import numpy as np
    import torch

    values = torch.randn(200_000) * torch.logspace(-10, 6, 200_000)
    values = torch.cat([values, torch.tensor([65504.0, 65520.0, 1e-8, -0.0, float("inf"), -float("inf")])])
    source = values.to(torch.bfloat16)
    direct = source.to(torch.float16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):
        through_float32 = source.float().numpy().astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(direct, through_float32)


def test_setting_transformers_cannot_read_back_skips_the_logits_row(tmp_path: Path) -> None:
    # the file states head_dim (llama.cpp reads it); transformers' reader takes Qwen3's default 128 instead
    folder = make_merged_folder(tmp_path / "m", "qwen3", tie=False, overrides={"head_dim": 32})
    rows = _rows(folder, tmp_path / "m.gguf", "F16")
    assert rows["gguf logits"].passed is None and "head_dim=128" in rows["gguf logits"].detail
    assert rows["gguf metadata"].passed and rows["gguf token ids"].passed


def test_row_blocks_quantize_to_the_same_bytes(merged, tmp_path: Path, monkeypatch) -> None:
    whole = {}
    for qtype in ("Q8_0", "BF16"):
        export_gguf(merged[CASES[0]], tmp_path / f"whole-{qtype}.gguf", qtype=qtype)
        whole[qtype] = (tmp_path / f"whole-{qtype}.gguf").read_bytes()
    monkeypatch.setattr(export_module, "ROW_CHUNK_ELEMENTS", 64 * 3)  # three rows of 64 at a time
    for qtype in ("Q8_0", "BF16"):
        export_gguf(merged[CASES[0]], tmp_path / f"rows-{qtype}.gguf", qtype=qtype)
        assert (tmp_path / f"rows-{qtype}.gguf").read_bytes() == whole[qtype]


def test_preflight_refuses_before_any_merge() -> None:
    from transformers import AutoConfig

    from tests.gguf_models import tiny_config

    preflight_gguf(tiny_config("llama", vocab=512, tie=False), ["F16", "Q8_0"])
    with pytest.raises(GgufUnsupportedError, match="'Q4_K'"):
        preflight_gguf(tiny_config("llama", vocab=512, tie=False), ["F16", "Q4_K"])
    with pytest.raises(GgufUnsupportedError, match="'gpt2'"):
        preflight_gguf(AutoConfig.for_model("gpt2"), ["F16"])
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    with pytest.raises(GgufUnsupportedError, match="'yarn'"):
        preflight_gguf(tiny_config("qwen2", vocab=512, tie=True, overrides={"rope_parameters": yarn}), ["F16"])
