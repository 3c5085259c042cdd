"""--quantized-base on the command line: dequantized (default), original (from the quantized repo's card) and
requantized, each with what it costs against the trained model (PeftModel on the quantized base)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_core.cli import main
from merge_core.quant_targets import COST_ROW
from tests.conftest import ALICE
from tests.factories import make_adapter
from tests.quant_factories import make_bnb_base, make_float_base


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-targets")
    float_dir = make_float_base(root / "float")
    nf4 = make_bnb_base(float_dir, root / "nf4", "nf4", double_quant=True)
    int8 = make_bnb_base(float_dir, root / "int8", "int8")
    adapter = make_adapter(float_dir, root / "adapter", target_modules=["q_proj", "v_proj", "up_proj"])
    return {"float": float_dir, "nf4": nf4, "int8": int8, "adapter": adapter}


def _run(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main([*argv, "--quiet", "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else {}), captured.err


def _cost(data: dict) -> dict:
    rows = [c for c in data["verification"]["checks"] if c["name"] == COST_ROW]
    assert len(rows) == 1, data["verification"]["checks"]
    return rows[0]


def test_dequantized_is_the_default_and_writes_a_plain_model(bases, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, data, err = _run(capsys, str(bases["nf4"]), str(bases["adapter"]), str(out), "--dtype", "float32")
    assert code == 0, err
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert "target" in (out / "README.md").read_text() and "dequantized" in (out / "README.md").read_text()


def test_original_merges_into_the_model_the_card_names(bases, hub_server, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", ALICE)
    (bases["nf4"] / "README.md").write_text("---\nbase_model: acme/tiny-llama\n---\n# tiny llama, 4-bit\n")
    for repo, folder in [("acme/tiny-llama", bases["float"]), ("acme/tiny-llama-bnb-4bit", bases["nf4"])]:
        hub_server.create_repo(repo)
        hub_server.upload_dir(repo, folder)
    url = hub_server.url
    original, plain = tmp_path / "original", tmp_path / "plain"
    code, data, err = _run(capsys, "acme/tiny-llama-bnb-4bit", str(bases["adapter"]), str(original),
                           "--quantized-base", "original", "--verify", "--endpoint", url)  # fmt: skip
    assert code == 0, err
    code, _, err = _run(capsys, "acme/tiny-llama", str(bases["adapter"]), str(plain), "--endpoint", url)
    assert code == 0, err
    assert (original / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    cost = _cost(data)
    assert (
        cost["passed"] is None and "top-1 agreement" in cost["value"] and "differs from the trained" in cost["detail"]
    )
    assert any("acme/tiny-llama" in note and "original" in note for note in data["notes"])
    card = (original / "README.md").read_text()
    assert "acme/tiny-llama-bnb-4bit" in card and "original" in card and "top-1 agreement" in card
    # the default target says where the original is, so the user can choose it
    code, data, err = _run(capsys, "acme/tiny-llama-bnb-4bit", str(bases["adapter"]), str(tmp_path / "default"),
                           "--endpoint", url)  # fmt: skip
    assert code == 0, err
    assert any("made from acme/tiny-llama;" in note for note in data["notes"]), data["notes"]


def test_original_without_a_named_base_is_refused(bases, tmp_path: Path, capsys) -> None:
    quantized = tmp_path / "nameless"
    quantized.mkdir()
    for f in bases["nf4"].iterdir():
        if f.name != "README.md":
            (quantized / f.name).write_bytes(f.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    config.pop("_name_or_path", None)
    (quantized / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(quantized), str(bases["adapter"]), str(out), "--quantized-base", "original")
    assert code == 2 and "--original-base" in err and not out.exists()


@pytest.mark.parametrize(
    "kind, keys, layer",
    [
        ("nf4", ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"), "4bit"),
        ("int8", ("load_in_8bit", "llm_int8_threshold"), "8bit"),
    ],
)
def test_requantized_keeps_the_settings_loads_and_reports_its_cost(
    bases, tmp_path: Path, capsys, kind: str, keys: tuple[str, ...], layer: str
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "requantized"
    code, data, err = _run(capsys, str(bases[kind]), str(bases["adapter"]), str(out),
                           "--quantized-base", "requantized", "--verify", "--functional", "never")  # fmt: skip
    assert code == 0, err
    want = json.loads((bases[kind] / "config.json").read_text())["quantization_config"]
    got = json.loads((out / "config.json").read_text())["quantization_config"]
    for key in keys:
        assert got[key] == want[key], key
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert any(f"Linear{layer}" in type(m).__name__ for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model.train()(torch.tensor([[1, 2, 3]])).logits).all()
    cost = _cost(data)
    assert cost["passed"] is None and "top-1 agreement" in cost["value"]
    assert "top-1 agreement" in (out / "README.md").read_text()
    assert not list(tmp_path.glob("*-tmp"))  # the staging folders are gone
