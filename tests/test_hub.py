"""Hub IO end to end with the real huggingface_hub client against a local Hub-compatible server."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from merge_core.errors import (
    AdapterConfigError,
    BaseCheckpointError,
    HubNetworkError,
    PushError,
    RepoAccessError,
    RepoNotFound,
    RevisionNotFound,
    TargetModuleNotFoundError,
)
from merge_core.pipeline import MergeRequest, push_merged, run_merge
from tests.conftest import HUB_PORT
from tests.factories import load_model, logits, make_adapter, make_base, make_tokenizer, peft_reference, prompt_ids
from tests.hubserver import HubServer

ALICE = "hf_alice_write_token_0123456789"
ALICE_READ = "hf_alice_read_token_0123456789"
BOB = "hf_bob_write_token_0123456789"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_base(root / "base", "llama")
    make_tokenizer(base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# tiny llama\n")
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "acme/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    from transformers import LlamaConfig, LlamaForCausalLM

    deeper = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    deeper.save_pretrained(root / "deep")
    wrong = make_adapter(root / "deep", root / "wrong-adapter", target_modules=["q_proj"])
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((base / "config.json").read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(base / "model.safetensors"), pickled / "pytorch_model.bin")
    return {"base": base, "adapter": adapter, "wrong": wrong, "pickled": pickled}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, models):
    server = HubServer(tmp_path_factory.mktemp("hub"), port=HUB_PORT).start()
    server.add_user("alice", ALICE, write=True)
    server.add_user("alice", ALICE_READ, write=False)
    server.add_user("bob", BOB, write=True)
    for repo, folder, kw in [
        ("acme/tiny-llama", models["base"], {}),
        ("alice/tiny-lora", models["adapter"], {}),
        ("acme/deep-lora", models["wrong"], {}),
        ("acme/pickled-llama", models["pickled"], {}),
        ("acme/private-llama", models["base"], {"private": True}),
        ("acme/gated-llama", models["base"], {"gated": True}),
    ]:
        server.create_repo(repo, **kw)
        server.upload_dir(repo, folder)
    yield server
    server.stop()


def test_merge_by_hub_ids_push_and_load_back(tmp: Path, hub: HubServer, models, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    result = run_merge(MergeRequest(adapter="alice/tiny-lora", base="", token=ALICE, endpoint=hub.url), tmp / "work")
    assert result.inputs.base.name == "acme/tiny-llama"  # suggested from the adapter's config
    assert result.verification.passed, result.verification.to_text()
    pushed = push_merged(result, "tiny-merged", token=ALICE, endpoint=hub.url)
    assert pushed.repo_id == "alice/tiny-merged"
    assert pushed.repo_url.endswith("/alice/tiny-merged") and len(pushed.commit_oid) == 40

    # Exactly one commit carries the model, and it has everything.
    commits = [c for c in hub.commits("alice/tiny-merged") if "model.safetensors" in json.dumps(c)]
    assert len(commits) == 1
    files = hub.repo_files("alice/tiny-merged")
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "generation_config.json"} <= set(files)

    # Loaded back through the same endpoint with plain transformers, it reproduces base+adapter.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained("alice/tiny-merged", token=ALICE, dtype=torch.float32).eval()
    ref = peft_reference(models["base"], models["adapter"])
    ids = prompt_ids()
    assert (logits(merged, ids) - logits(ref, ids)).abs().max().item() <= 1e-4
    assert (logits(load_model(models["base"]), ids) - logits(ref, ids)).abs().max().item() > 1e-2

    from huggingface_hub import ModelCard

    card = ModelCard.load("alice/tiny-merged", token=ALICE)
    assert card.data.base_model == "acme/tiny-llama"
    assert card.data.to_dict()["base_model_relation"] == "finetune"
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert {"lora", "merge", "peft"} <= set(card.data.tags)
    assert "alice/tiny-lora" in card.text and "Verification" in card.text

    # The token is nowhere: not in the repo, the logs, the output, or the server's log.
    for content in files.values():
        assert ALICE.encode() not in content
    out = capsys.readouterr()
    assert ALICE not in caplog.text and ALICE not in out.out and ALICE not in out.err
    assert ALICE not in repr(hub.request_log)
    assert ALICE not in repr(result) and ALICE not in repr(pushed)


def test_bad_pair_is_refused_before_any_shard_download(tmp: Path, hub: HubServer) -> None:
    hub.clear_log()
    with pytest.raises(TargetModuleNotFoundError) as err:
        run_merge(MergeRequest(adapter="acme/deep-lora", base="acme/tiny-llama", endpoint=hub.url), tmp / "work")
    assert "acme/tiny-llama" in str(err.value)
    shard_reads = [
        r
        for r in hub.requests_for(method="GET", path_contains="model.safetensors")
        if "adapter_model" not in r.path and not r.headers.get("Range", r.headers.get("range"))
    ]
    assert shard_reads == [], [r.path for r in shard_reads]
    assert not (tmp / "work" / "merged").exists()


@pytest.mark.parametrize(
    "request_kwargs, error, words",
    [
        (dict(adapter="alice/no-such-adapter"), RepoNotFound, ["alice/no-such-adapter", "not found", "log in"]),
        (dict(adapter="alice/tiny-lora", base="acme/private-llama"), RepoNotFound, ["acme/private-llama", "private"]),
        (dict(adapter="alice/tiny-lora", base="acme/gated-llama", token=BOB), RepoAccessError, ["gated", "accept"]),
        (dict(adapter="alice/tiny-lora", adapter_revision="v9"), RevisionNotFound, ["v9", "alice/tiny-lora"]),
        (dict(adapter="acme/tiny-llama"), AdapterConfigError, ["full model", "swap"]),
        (dict(adapter="alice/tiny-lora", base="acme/pickled-llama"), BaseCheckpointError, ["pickle", "safetensors"]),
    ],
)
def test_clear_errors(tmp: Path, hub: HubServer, request_kwargs, error, words) -> None:
    with pytest.raises(error) as err:
        run_merge(MergeRequest(endpoint=hub.url, **request_kwargs), tmp / "work")
    for word in words:
        assert word.lower() in str(err.value).lower(), str(err.value)


def test_private_and_gated_work_with_access(tmp: Path, hub: HubServer) -> None:
    hub.grant("acme/private-llama", ALICE)
    hub.grant("acme/gated-llama", ALICE)
    for base in ("acme/private-llama", "acme/gated-llama"):
        result = run_merge(
            MergeRequest(adapter="alice/tiny-lora", base=base, token=ALICE, endpoint=hub.url), tmp / base
        )
        assert result.verification.passed


def test_network_failure_is_retryable(tmp: Path) -> None:
    from tests.conftest import _free_port

    with pytest.raises(HubNetworkError, match="try again"):
        run_merge(MergeRequest(adapter="alice/tiny-lora", endpoint=f"http://127.0.0.1:{_free_port()}"), tmp / "work")


@pytest.fixture(scope="module")
def merged_result(tmp_path_factory, hub: HubServer):
    return run_merge(
        MergeRequest(adapter="alice/tiny-lora", token=ALICE, endpoint=hub.url), tmp_path_factory.mktemp("merged-once")
    )


def test_push_refusals(hub: HubServer, merged_result) -> None:
    with pytest.raises(PushError, match="read-only"):
        push_merged(merged_result, "alice/ro-attempt", token=ALICE_READ, endpoint=hub.url)
    with pytest.raises(PushError, match="Log in"):
        push_merged(merged_result, "alice/no-token", token="", endpoint=hub.url)
    with pytest.raises(PushError, match="namespace"):
        push_merged(merged_result, "acme/not-mine", token=ALICE, endpoint=hub.url)
    push_merged(merged_result, "alice/taken", token=ALICE, endpoint=hub.url)
    with pytest.raises(PushError, match="already exists"):
        push_merged(merged_result, "alice/taken", token=ALICE, endpoint=hub.url)


def test_interrupted_upload_leaves_no_partial_model(hub: HubServer, merged_result) -> None:
    hub.fail_uploads_after(1000)
    try:
        with pytest.raises(PushError) as err:
            push_merged(merged_result, "alice/interrupted", token=ALICE, endpoint=hub.url)
    finally:
        hub.fail_uploads_after(None)
    assert "nothing was committed" in str(err.value)
    files = hub.repo_files("alice/interrupted")
    assert not [f for f in files if f.endswith(".safetensors") or f == "config.json"]
    # and a retry in update mode lands the whole model in one commit
    push_merged(merged_result, "alice/interrupted", token=ALICE, endpoint=hub.url, mode="update")
    assert "model.safetensors" in hub.repo_files("alice/interrupted")


def test_update_and_pull_request_modes(tmp: Path, hub: HubServer, merged_result) -> None:
    push_merged(merged_result, "alice/target", token=ALICE, endpoint=hub.url)
    before = hub.repo_files("alice/target")
    with pytest.raises(PushError, match="nothing to propose"):
        push_merged(merged_result, "alice/target", token=ALICE, endpoint=hub.url, mode="pr")
    in_bf16 = run_merge(
        MergeRequest(adapter="alice/tiny-lora", token=ALICE, endpoint=hub.url, dtype="bfloat16"), tmp / "bf16"
    )
    pr = push_merged(in_bf16, "alice/target", token=ALICE, endpoint=hub.url, mode="pr")
    assert pr.pr_url and "discussions" in pr.pr_url
    assert hub.repo_files("alice/target") == before  # main untouched by a PR
    assert hub.repo_files("alice/target", revision="refs/pr/1")["model.safetensors"] != before["model.safetensors"]
    update = push_merged(in_bf16, "alice/target", token=ALICE, endpoint=hub.url, mode="update")
    assert (
        hub.repo_files("alice/target")["model.safetensors"]
        == hub.repo_files("alice/target", revision="refs/pr/1")["model.safetensors"]
    )
    assert update.pr_url is None
    with pytest.raises(PushError, match="does not exist"):
        push_merged(merged_result, "alice/never-created", token=ALICE, endpoint=hub.url, mode="update")
