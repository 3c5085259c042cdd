"""The app's handlers called directly (no browser): merge of the bundled demo, errors, push, cleanup."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import app
import app_gpu
from merge_core import pipeline
from merge_core.card import build_model_card
from tests.conftest import HUB_PORT
from tests.hubserver import HubServer

ALICE = "hf_alice_app_write_token_0123456789"
ALICE_READ = "hf_alice_app_read_token_0123456789"

FUNCTIONAL_AUTO = next(iter(pipeline.FUNCTIONAL))
DEMO_DIR = app.DEMO_DIR


def no_progress(*args: Any, **kwargs: Any) -> None:
    return None


def view(result: Any) -> dict[str, Any]:
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}


def merge(
    adapter: str,
    base: str = "",
    *,
    dtype: str = "auto",
    prompt: str = "",
    token: str = "",
    previous: app.MergeResult | None = None,
    repo_name: str = "",
    oauth=None,
    profile=None,
    adapter_revision: str = "",
    combination: str = "stack",
    session: str | None = None,
    **form: Any,
) -> dict[str, Any]:
    prompt = prompt or (app.LOCAL.demo_prompts() or ["Hello"])[0]
    values = app.MergeForm(
        adapter=adapter,
        base=base,
        adapter_revision=adapter_revision,
        dtype=dtype,
        functional=FUNCTIONAL_AUTO,
        combination=combination,
        prompt=prompt,
        max_new_tokens=24,
        repo_name=repo_name,
        token=token,
        state=previous,
        **form,
    )
    return view(app.merge(values, oauth, profile, progress=no_progress, session=session))


def push(
    result,
    repo_name: str,
    *,
    token: str = "",
    mode: str = "Create new repo",
    oauth=None,
    profile=None,
    private: bool = False,
) -> dict[str, Any]:
    form = app.PushForm(repo_name=repo_name, private=private, push_mode=mode, token=token, state=result)
    return view(app.push(form, oauth, profile, progress=no_progress))


def lms_dirs(root: Path) -> list[str]:
    """The per-request folders; each live one has its lock file beside it, and nothing else is there."""
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("lms-"))
    folders = [n for n in names if not n.endswith(".lock")]
    assert sorted(n for n in names if n.endswith(".lock")) == [f"{n}.lock" for n in folders], names
    return folders


@pytest.fixture(scope="module", autouse=True)
def demo_present() -> None:
    if not (DEMO_DIR / "base").is_dir() or not (DEMO_DIR / "adapter").is_dir():
        pytest.fail(f"The bundled demo is missing ({DEMO_DIR}); build it with `python scripts/make_demo.py`.")


@pytest.fixture
def tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The app's per-merge folders (tempfile.mkdtemp) land here, so the test can see them all."""
    root = tmp_path / "tempdir"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    """A local Hub with the demo as acme/tiny-llama + alice/tiny-lora, and an adapter whose config
    names a server-side folder (a copy of the base, standing for the HF cache) as its base."""
    root = tmp_path_factory.mktemp("app-hub")
    server = HubServer(root / "hub", port=HUB_PORT).start()
    server.add_user("alice", ALICE, write=True)
    server.add_user("alice", ALICE_READ, write=False)
    server.add_user("mallory", "hf_mallory_token_0123456789", write=True)
    base, adapter = app.DEMO_DIR / "base", app.DEMO_DIR / "adapter"

    def adapter_copy(name: str, declared: str) -> Path:
        folder = root / name
        shutil.copytree(adapter, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = declared
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder

    server_folder = root / "cache" / "models--acme--secret-llama"
    shutil.copytree(base, server_folder)
    for repo, folder in [
        ("acme/tiny-llama", base),
        ("alice/tiny-lora", adapter_copy("tiny-lora", "acme/tiny-llama")),
        ("mallory/evil-lora", adapter_copy("evil-lora", str(server_folder))),
    ]:
        server.create_repo(repo)
        server.upload_dir(repo, folder)
    server.server_folder = server_folder  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory: pytest.TempPathFactory):
    """One merge of the bundled demo, shared by the tests that only read or push it."""
    tempdir = tmp_path_factory.mktemp("shared-merge")
    old = tempfile.tempdir
    tempfile.tempdir = str(tempdir)
    try:
        out = merge("demo/adapter", "demo/base")
    finally:
        tempfile.tempdir = old
    assert isinstance(out["state"], app.MergeResult), out["error"]
    yield out
    app.discard(out["state"])


def test_merge_of_the_demo_passes_every_check(tempdir: Path) -> None:
    out = merge("demo/adapter", "demo/base")
    result = out["state"]
    assert isinstance(result, app.MergeResult), out["error"]
    assert out["error"]["visible"] is False
    checks = result.verification.checks
    assert out["verdict"] == f"### ✅ All {len(checks)} checks passed", out["verdict"]
    table = out["table"]
    assert list(table.columns) == pipeline.VerificationReport.HEADERS
    assert len(table) == len(checks) >= 10
    assert set(table["result"]) == {"pass"}, table.to_string()
    assert {"structure", "numerics", "function"} <= set(table["group"])

    # Three generations: the merged model says exactly what base + adapter says; the base alone does not.
    assert out["gen_merged"] and out["gen_merged"] == out["gen_adapter"]
    assert out["gen_base"] != out["gen_adapter"]
    assert "identical" in out["gen_note"]
    # Merged vs separate, measured: a warm-up then 3 runs each, shown beside the generations.
    timed = result.speed
    assert timed.runs == 3 and all(
        len(t.tokens_per_s) == len(t.first_token_s) == 3 for t in (timed.separate, timed.merged)
    )
    assert all(v > 0 for t in (timed.separate, timed.merged) for v in [t.load_s, *t.tokens_per_s, *t.first_token_s])
    assert timed.separate_bytes > timed.merged_bytes > 0  # base + adapter vs the merged files
    assert "| needs PEFT at inference | yes | no |" in out["gen_note"] and "tokens/s" in out["gen_note"]
    assert timed.verdict() in out["gen_note"]
    model_card = build_model_card(
        result.report, result.verification, repo_id="alice/x", base_id="acme/base", base_revision=None,
        adapter_id="alice/lora", adapter_revision=None, speed=timed,
    )  # fmt: skip
    assert "## Merged vs separate, measured" in str(model_card) and timed.verdict() in str(model_card)
    assert "MB" in out["sizes"] and "GB" in out["sizes"] and "e-" not in out["sizes"]
    assert result.report.summary() == out["summary"]
    assert out["repo_name"] == result.inputs.suggested_name  # no login, no token: no owner prefix
    assert out["push_btn"]["interactive"] is True and out["merge_btn"]["interactive"] is True

    # Its own temp folder, holding the merged model and its card.
    assert lms_dirs(tempdir) == [result.workdir.name]
    assert (result.output_dir / "README.md").is_file() and (result.output_dir / "config.json").is_file()

    # A new merge replaces (and removes) the previous folder; ending the session removes the new one.
    again = merge("demo/adapter", "demo/base", dtype="bfloat16", previous=result, repo_name=out["repo_name"])
    assert isinstance(again["state"], app.MergeResult), again["error"]
    assert not result.workdir.exists()
    assert lms_dirs(tempdir) == [again["state"].workdir.name]
    assert "all floating tensors bfloat16" in set(again["table"]["threshold"])
    app.discard(again["state"])
    assert lms_dirs(tempdir) == []


@pytest.mark.parametrize(
    "adapter, words",
    [
        ("nobody/does-not-exist", ["nobody/does-not-exist", "was not found", "Check the spelling"]),
        ("not a valid id", ["'not a valid id'", "owner/name"]),
        ("/etc", ["'/etc' is a local path", "Hub ID"]),
        ("", ["Enter a LoRA adapter"]),
    ],
)
def test_bad_adapter_shows_the_specific_message_and_leaves_nothing(
    tempdir: Path, hub: HubServer, adapter: str, words: list[str]
) -> None:
    out = merge(adapter)
    assert out["state"] is None
    assert out["error"]["visible"] is True
    for word in words:
        assert word in out["error"]["value"], out["error"]["value"]
    assert "Traceback" not in out["error"]["value"]
    assert out["verdict"] == "" and len(out["table"]) == 0
    assert out["push_btn"]["interactive"] is False and out["merge_btn"]["interactive"] is True
    assert lms_dirs(tempdir) == []


def test_failed_merge_also_removes_the_previous_result(tempdir: Path) -> None:
    first = merge("demo/adapter", "demo/base")["state"]
    assert isinstance(first, app.MergeResult)
    out = merge("nobody/does-not-exist", previous=first)
    assert out["state"] is None and not first.workdir.exists()
    assert lms_dirs(tempdir) == []


def test_unexpected_exception_names_its_type_only(tempdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(request, workdir, progress):
        (Path(workdir) / "partial").write_text("x")
        raise RuntimeError(f"internal detail with {request.token}")

    with monkeypatch.context() as patch:
        patch.setattr(app.pipeline, "run_merge", boom)
        out = merge("demo/adapter", "demo/base", token="hf_secret_token_in_error_0123")
    message = out["error"]["value"]
    assert "RuntimeError" in message and "internal detail" not in message and "hf_secret" not in message
    assert out["state"] is None and lms_dirs(tempdir) == []
    again = merge("demo/adapter", "demo/base")["state"]  # still serving
    assert isinstance(again, app.MergeResult) and again.workdir.parent == tempdir
    app.discard(again)


def test_model_checks_failure_keeps_the_merge_and_says_why(tempdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gpu(*args, **kwargs):
        raise app.gr.Error("No GPU was available after 60s")

    monkeypatch.setattr(app.pipeline, "model_checks", no_gpu)
    out = merge("demo/adapter", "demo/base")
    result = out["state"]
    assert isinstance(result, app.MergeResult) and out["error"]["visible"] is False
    row = out["table"][out["table"]["group"] == "function"].iloc[0]
    assert row["result"] == "skipped" and "No GPU was available" in row["detail"]
    assert out["verdict"].startswith("### ✅ All") and "1 skipped" in out["verdict"]
    assert out["gen_merged"] == "" and "No sample generation" in out["gen_note"]
    app.discard(result)


def test_speed_verdict_claims_a_difference_only_outside_the_runs_spread() -> None:
    from merge_core.speed import SpeedComparison, Timing

    def comparison(separate: list[float], merged: list[float]) -> SpeedComparison:
        return SpeedComparison(Timing(1.0, separate, [0.1] * 3), Timing(1.0, merged, [0.1] * 3), 10, 9, 3, 16, "cpu")

    assert comparison([100, 110, 120], [115, 125, 130]).verdict().startswith("no measurable difference")
    assert comparison([100, 101, 102], [120, 121, 125]).verdict() == "merged generates 20% faster than base + adapter"
    assert comparison([120, 121, 125], [100, 101, 102]).verdict() == "merged generates 17% slower than base + adapter"


def test_gpu_duration_grows_with_model_size_and_is_capped() -> None:
    small = app_gpu.gpu_seconds(app_gpu.GpuJob(Path("b"), Path("a"), Path("o"), None, 0.0001))
    seven_b = app_gpu.gpu_seconds(app_gpu.GpuJob(Path("b"), Path("a"), Path("o"), None, 14.5))
    huge = app_gpu.gpu_seconds(app_gpu.GpuJob(Path("b"), Path("a"), Path("o"), None, 500.0))
    assert small == app_gpu.GPU_BASE_SECONDS < seven_b < huge == app_gpu.GPU_MAX_SECONDS


def test_push_without_login_or_token_asks_to_log_in(demo_result) -> None:
    out = push(demo_result["state"], "someone/x")
    assert out["push_result"]["visible"] is False
    assert out["error"]["visible"] is True
    message = out["error"]["value"]
    assert "sign in with hugging face" in message.lower() and "paste a write token" in message
    assert out["push_btn"]["interactive"] is True  # the merge is still there to push once logged in


def test_push_without_a_merge_says_so() -> None:
    out = push(None, "someone/x", token=ALICE)
    assert "merge first" in out["error"]["value"] and out["push_btn"]["interactive"] is False


def test_hub_adapter_base_from_its_config_then_push_and_pr(tempdir: Path, hub: HubServer, capsys) -> None:
    out = merge("alice/tiny-lora", token=ALICE)  # pasted token; the base comes from the adapter's config
    result = out["state"]
    assert isinstance(result, app.MergeResult), out["error"]
    assert (
        result.inputs.base.name == "acme/tiny-llama" and len(result.inputs.adapter_revision or "") == 40
    )  # pinned commit
    assert out["verdict"].startswith("### ✅ All"), out["verdict"]
    assert out["repo_name"] == f"alice/{result.inputs.suggested_name}"  # whoami of the pasted token

    pushed = push(result, out["repo_name"], token=ALICE)
    assert pushed["error"]["visible"] is False, pushed["error"]
    text = pushed["push_result"]["value"]
    assert pushed["push_result"]["visible"] and f"[{out['repo_name']}]({hub.url}/{out['repo_name']})" in text
    assert f"vllm serve {out['repo_name']}" in text and "llama-cli" not in text  # no GGUF files, no GGUF lines
    files = hub.repo_files(out["repo_name"])
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(files)
    assert b"alice/tiny-lora" in files["README.md"]

    again = push(result, out["repo_name"], token=ALICE)  # "new" refuses an existing repo, clearly
    assert "already exists" in again["error"]["value"]
    same = push(result, out["repo_name"], token=ALICE, mode="Open a pull request")
    assert "nothing to propose" in same["error"]["value"]

    # A bfloat16 merge of the same adapter, proposed to the same repo as a pull request.
    bf16 = merge("alice/tiny-lora", token=ALICE, dtype="bfloat16", previous=result, repo_name=out["repo_name"])
    assert not result.workdir.exists() and bf16["repo_name"] == out["repo_name"]
    result = bf16["state"]
    pr = push(result, out["repo_name"], token=ALICE, mode="Open a pull request")
    assert pr["error"]["visible"] is False, pr["error"]
    assert "Pull request:" in pr["push_result"]["value"] and "/discussions/" in pr["push_result"]["value"]
    read_only = push(result, out["repo_name"], token=ALICE_READ, mode="Update existing repo")
    assert "read-only" in read_only["error"]["value"]

    captured = capsys.readouterr()
    for value in [*out.values(), *pushed.values(), *pr.values(), *read_only.values()]:
        assert ALICE not in repr(value) and ALICE_READ not in repr(value)
    assert ALICE not in captured.out + captured.err
    app.discard(result)
    assert lms_dirs(tempdir) == []


def test_login_token_and_profile_are_used(tempdir: Path, hub: HubServer, demo_result) -> None:
    oauth = app.gr.OAuthToken(token=ALICE, scope="openid profile contribute-repos", expires_at=int(time.time()) + 3600)
    profile = app.gr.OAuthProfile({"name": "Alice", "preferred_username": "alice", "profile": "", "picture": ""})
    out = merge("demo/adapter", "demo/base", oauth=oauth, profile=profile)
    assert out["repo_name"] == f"alice/{out['state'].inputs.suggested_name}"
    pushed = push(out["state"], "demo-from-login", oauth=oauth, profile=profile)
    assert pushed["error"]["visible"] is False, pushed["error"]
    assert "model.safetensors" in hub.repo_files("alice/demo-from-login")
    app.discard(out["state"])


def test_adapter_naming_a_server_folder_as_its_base_is_refused(tempdir: Path, hub: HubServer) -> None:
    hub.clear_log()
    out = merge("mallory/evil-lora")
    assert out["state"] is None
    message = out["error"]["value"]
    assert "names a local folder as its base model" in message and "Base model" in message
    assert lms_dirs(tempdir) == []
    # The explicit form of the same trick is refused too, and so is a list that hides it.
    for adapter, base in [
        ("alice/tiny-lora", str(hub.server_folder)),  # type: ignore[attr-defined]
        (f"alice/tiny-lora, {hub.server_folder}:0.5", "acme/tiny-llama"),
    ]:  # type: ignore[attr-defined]
        out = merge(adapter, base)
        assert out["state"] is None and "is a local path" in out["error"]["value"], out["error"]
    assert lms_dirs(tempdir) == []


def test_two_weighted_adapters_with_a_combination_type(tempdir: Path, demo_present: None) -> None:
    out = merge("demo/adapter:0.6, demo/adapter:0.4", "demo/base", combination="linear")
    result = out["state"]
    assert isinstance(result, app.MergeResult), out
    assert "All" in out["verdict"] and "passed" in out["verdict"], out["verdict"]
    card = (result.output_dir / "README.md").read_text()
    assert "linear(" in card
    app.discard(result)


def test_gguf_files_too_are_written_verified_and_kept_beside_the_model(tempdir: Path, hub: HubServer) -> None:
    out = merge("demo/adapter", "demo/base", gguf_types=["q8_0", "Q8_0"], quantized_target="dequantized")
    result = out["state"]
    assert isinstance(result, app.MergeResult), out["error"]
    assert list(result.gguf_files) == ["Q8_0"] and result.gguf_files["Q8_0"].is_file()
    rows = out["table"].set_index("check")
    assert {"gguf metadata (Q8_0)", "gguf token ids (Q8_0)", "gguf logits (Q8_0)"} <= set(rows.index)
    assert set(rows.loc[rows.index.str.startswith("gguf "), "result"]) == {"pass"}, rows.to_string()
    assert "gguf" in (result.output_dir / "README.md").read_text()

    # After the push: how to run the pushed repo, in the result and in the card, GGUF lines included.
    pushed = push(result, "alice/demo-gguf", token=ALICE)
    assert pushed["error"]["visible"] is False, pushed["error"]
    text = pushed["push_result"]["value"]
    card = hub.repo_files("alice/demo-gguf")["README.md"].decode()
    for snippet in [
        'AutoModelForCausalLM.from_pretrained("alice/demo-gguf"',
        'pipeline("text-generation", model="alice/demo-gguf")',
        "vllm serve alice/demo-gguf",
        "--model-id alice/demo-gguf",
        "llama-cli -hf alice/demo-gguf:Q8_0",
        "ollama run hf.co/alice/demo-gguf:Q8_0",
    ]:
        assert snippet in text and snippet in card, snippet
    app.discard(result)


def test_gguf_for_an_architecture_without_support_is_a_note_not_a_refusal(
    tempdir: Path, hub: HubServer, tmp_path: Path
) -> None:
    from tests.factories import make_adapter, make_base

    base = make_base(tmp_path / "gpt2", "gpt2")
    adapter = make_adapter(base, tmp_path / "gpt2-lora", target_modules=["c_attn"])
    for repo, folder in [("acme/tiny-gpt2", base), ("alice/gpt2-lora", adapter)]:
        hub.create_repo(repo)
        hub.upload_dir(repo, folder)
    out = merge("alice/gpt2-lora", "acme/tiny-gpt2", gguf_types=["F16"])
    result = out["state"]
    assert isinstance(result, app.MergeResult), out["error"]
    assert result.gguf_files == {} and not list(result.output_dir.glob("*.gguf"))
    assert "No GGUF file was made" in out["summary"] and "'gpt2'" in out["summary"]
    app.discard(result)


def test_quantized_target_on_a_plain_base_is_refused_in_one_sentence(tempdir: Path) -> None:
    out = merge("demo/adapter", "demo/base", quantized_target="requantized")
    assert not isinstance(out["state"], app.MergeResult)
    assert "not quantized" in out["error"]["value"] and "default target" in out["error"]["value"]
    assert lms_dirs(tempdir) == []


def test_a_link_prefills_the_form_under_the_rules_of_typed_input() -> None:
    from merge_core.frontend import KEEP

    query = {
        "adapter": "alice/tiny-lora",
        "base": "demo/base",
        "adapter_revision": "v1.0",
        "base_revision": "0123abcd",
        "dtype": "bfloat16",
        "prompt": "ignored: a link fills the model fields only",
    }
    filled = app.prefill(app.gr.Request(query_params=query))
    got = (filled.adapter, filled.base, filled.adapter_revision, filled.base_revision, filled.dtype)
    assert got == ("alice/tiny-lora", "demo/base", "v1.0", "0123abcd", "bfloat16")
    assert filled.error is KEEP  # nothing refused: the error box stays as it is

    bad = {"adapter": "x/" + "y" * 1_000, "base": "/etc", "dtype": "int3", "base_revision": " main "}
    refused = app.prefill(app.gr.Request(query_params=bad))
    assert (refused.adapter, refused.base, refused.dtype) == (KEEP, KEEP, KEEP)
    assert refused.base_revision == "main" and refused.adapter_revision is KEEP
    message = refused.error["value"]
    assert refused.error["visible"] and message.startswith("⚠️ Not filled in from the link:")
    assert "limit is 1,000" in message and "'/etc' is a local path" in message and "Unknown dtype 'int3'" in message

    nothing = app.prefill(app.gr.Request(query_params={}))
    assert all(getattr(nothing, name) is KEEP for name in app.field_names(type(nothing)))
