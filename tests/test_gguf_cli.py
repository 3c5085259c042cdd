"""--gguf on the command line: refused before the merge, written and verified after it, pushed in the same commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merge_core.cli import main
from tests.conftest import ALICE
from tests.factories import make_adapter, make_base
from tests.gguf_models import make_merged_folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with a byte-level BPE tokenizer the exporter accepts, and a LoRA on it."""
    root = tmp_path_factory.mktemp("gguf-cli")
    base = make_merged_folder(root / "base", "llama", tie=False)
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    return {"base": base, "adapter": adapter}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_merge_writes_and_verifies_each_gguf_type(llama, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny-merged"
    code, stdout, stderr = _run(
        capsys, str(llama["base"]), str(llama["adapter"]), str(out), "--gguf", "f16, Q8_0,F16", "--verify", "--json"
    )
    assert code == 0, stderr + stdout
    assert sorted(p.name for p in out.glob("*.gguf")) == ["tiny-merged-F16.gguf", "tiny-merged-Q8_0.gguf"]
    data = json.loads(stdout)
    assert data["gguf_files"] == {t: str(out / f"tiny-merged-{t}.gguf") for t in ("F16", "Q8_0")}
    checks = {c["name"]: c for c in data["verification"]["checks"]}
    rows = [f"gguf {row} ({qtype})" for qtype in ("F16", "Q8_0") for row in ("metadata", "token ids", "logits")]
    assert {name for name in checks if name.startswith("gguf ")} == set(rows)
    for row in rows:
        assert checks[row]["status"] == "pass", checks[row]


def test_unsupported_architecture_is_refused_before_the_merge(tmp_path: Path, capsys) -> None:
    base = make_base(tmp_path / "gpt2", "gpt2")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["c_attn"])
    out = tmp_path / "out"
    code, _, stderr = _run(capsys, str(base), str(adapter), str(out), "--gguf", "F16")
    assert code == 2
    assert "gpt2" in stderr and "GGUF" in stderr and stderr.count("\n") == 1
    assert not out.exists()


def test_unknown_gguf_type_is_refused_before_anything_is_read(tmp_path: Path, capsys) -> None:
    code, _, stderr = _run(capsys, str(tmp_path / "nowhere"), str(tmp_path / "no-adapter"), str(tmp_path / "o"),
                           "--gguf", "Q4_K")  # fmt: skip
    assert code == 2 and "Q4_K" in stderr and "Q8_0" in stderr


def test_push_carries_the_gguf_files_and_the_card_says_how_to_run_them(
    llama, hub_server, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", ALICE)
    out = tmp_path / "local-name"  # not the repo's name: the files are renamed for llama-cli -hf
    args = [str(llama["base"]), str(llama["adapter"]), str(out), "--gguf", "Q8_0,F16"]
    code, stdout, stderr = _run(
        capsys,
        *args,
        "--verify",
        "--functional",
        "never",
        "--push",
        "alice/tiny-gguf",
        "--endpoint",
        hub_server.url,
    )
    assert code == 0, stderr + stdout
    files = set(hub_server.repo_files("alice/tiny-gguf"))
    assert {"tiny-gguf-Q8_0.gguf", "tiny-gguf-F16.gguf", "model.safetensors", "README.md"} <= files
    commits = [c for c in hub_server.commits("alice/tiny-gguf") if ".gguf" in json.dumps(c)]
    assert len(commits) == 1 and "model.safetensors" in json.dumps(commits[0])
    card = (out / "README.md").read_text()
    assert "- gguf" in card.split("---")[1]
    for qtype in ("Q8_0", "F16"):
        assert f"llama-cli -hf alice/tiny-gguf:{qtype}" in card
        assert f"ollama run hf.co/alice/tiny-gguf:{qtype}" in card
    assert "LM Studio: search alice/tiny-gguf" in card
