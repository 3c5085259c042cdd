"""The command line in-process (merge_core.cli.main): exit codes, output, the declared base, the
output guard's order (before any work) and the push preflight's order (before the merge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import merge_core.pipeline
from merge_core import cli
from tests.factories import make_adapter, make_base


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def test_json_report_and_exit_0(models, tmp_path: Path, capsys) -> None:
    base, adapter = models
    code = cli.main(
        [str(base), str(adapter), str(tmp_path / "out"), "--quiet", "--verify", "--functional", "never", "--json"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert data["verification"]["passed"] is True
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_dash_base_is_the_one_the_adapter_declares(models, tmp_path: Path, capsys) -> None:
    base, adapter = models
    assert cli.main(["-", str(adapter), str(tmp_path / "out"), "--quiet"]) == 0
    assert str(base) in (tmp_path / "out" / "README.md").read_text()


def test_existing_output_without_overwrite_is_refused_in_one_sentence(models, tmp_path: Path, capsys) -> None:
    base, adapter = models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert cli.main([str(base), str(adapter), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_refusals_come_before_any_input_is_read(models, tmp_path: Path, capsys, monkeypatch) -> None:
    """The output guard, bad options and the push preflight all answer before resolve_inputs runs."""
    base, adapter = models

    def must_not_run(*args, **kwargs):
        raise AssertionError("inputs were resolved before the refusal")

    monkeypatch.setattr(merge_core.pipeline, "resolve_inputs", must_not_run)
    monkeypatch.setattr(cli, "_token", lambda: None)
    cases = [
        ([str(base), str(adapter), str(base), "--overwrite"], "is the base model"),
        ([str(base), str(adapter), str(tmp_path / "o"), "--max-shard-size", "0"], "out of range"),
        ([str(base), str(adapter), str(tmp_path / "o"), "--push", "me/x"], "Log in"),
    ]
    for args, words in cases:
        assert cli.main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_verification_printed_and_push_refused_when_a_check_fails(models, tmp_path: Path, capsys, monkeypatch) -> None:
    from merge_core.hub import HubClient, PushMode, PushTarget
    from merge_core.verify import Check, VerificationReport

    base, adapter = models
    monkeypatch.setattr(
        HubClient,
        "preflight_push",
        lambda self, repo_id, mode, private=False: PushTarget(repo_id, PushMode.parse(mode), private),
    )
    failing = VerificationReport([Check("made to fail", "numerics", False, "1", "0", "for the test")])
    monkeypatch.setattr(merge_core.pipeline, "verify_merge", lambda *args, **kwargs: failing)
    code = cli.main([str(base), str(adapter), str(tmp_path / "out"), "--quiet", "--verify", "--push", "me/x"])
    out = capsys.readouterr()
    assert code == 2 and "made to fail" in out.out
    assert out.err == "error: Verification failed, so nothing was pushed. See the table above.\n"


def test_quiet_hides_the_library_bars_of_the_checks_and_restores_them(models, tmp_path: Path, capfd) -> None:
    from transformers.utils import logging as hf_logging

    base, adapter = models
    args = [str(base), str(adapter), str(tmp_path / "out"), "--quiet", "--verify", "--functional", "always"]
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as on a user's machine (the test environment may start with bars off)
    try:
        assert cli.main(args) == 0
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "is deprecated" not in err
        assert hf_logging.is_progress_bar_enabled()
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()
