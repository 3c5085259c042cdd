"""The streamed Hub-to-Hub push (merge_core.stream_push) against the local Hub test server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_core.errors import DiskBudgetError, PushError, StreamVerificationError
from merge_core.hub import HubClient
from merge_core.inputs import MergeRequest
from merge_core.progress import ProgressUpdate
from merge_core.stream_push import stream_merge_push
from tests.conftest import ALICE
from tests.factories import logits, make_base, peft_reference, prompt_ids
from tests.hubserver import HubServer
from tests.sharded_hub import SHARD, Env, model_commits, sharded_env, upload_pair


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    env = sharded_env(tmp_path_factory.mktemp("stream"), target_modules=["q_proj", "v_proj", "down_proj"])
    yield env
    env.hub.stop()


def _request(env: Env) -> MergeRequest:
    return MergeRequest(adapter="alice/sharded-lora", token=ALICE, endpoint=env.hub.url, max_shard_size=SHARD)


def _shards(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("model*.safetensors")}


def _lfs_puts(hub: HubServer, status: int | None = None) -> list:
    return [r for r in hub.requests_for("PUT", "/lfs-upload/") if status is None or r.status == status]


def test_streamed_push_lands_one_commit_within_the_disk_bound(env: Env, tmp_path: Path) -> None:
    base_shards = _shards(env.base)
    assert len(base_shards) >= 4
    updates: list[ProgressUpdate] = []
    target = HubClient(ALICE, env.hub.url).preflight_push("alice/streamed", "new")
    budget = sum(base_shards.values()) * 3 // 2  # less than base + output: the pipeline must stay inside it
    result = stream_merge_push(_request(env), target, tmp_path / "work", max_disk=budget, progress=updates.append)
    report, pushed = result
    assert pushed.repo_id == "alice/streamed" and len(pushed.commit_oid) == 40

    # One commit carries every shard, the index, config, tokenizer and card.
    assert len(model_commits(env.hub, "alice/streamed")) == 1
    files = env.hub.repo_files("alice/streamed")
    out_shards = [n for n in files if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(out_shards) >= 4 and sorted(out_shards) == report.shards
    assert {"model.safetensors.index.json", "config.json", "README.md", "tokenizer.json"} <= set(files)
    assert result.uploaded == sorted(out_shards) and result.already_on_hub == []
    assert result.downloaded == sorted(base_shards)

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained("alice/streamed", token=ALICE, dtype=torch.float32).eval()
    ref = peft_reference(env.base, env.adapter)
    ids = prompt_ids()
    assert (logits(merged, ids) - logits(ref, ids)).abs().max().item() <= 1e-4

    # Disk: never base + output at once; at most two input + two output shards, the adapter and small files.
    out_sizes = sorted(len(files[n]) for n in out_shards)
    small = sum(len(v) for n, v in files.items() if n not in out_shards) + sum(
        p.stat().st_size for p in env.base.iterdir() if p.name not in base_shards
    )
    adapter = sum(p.stat().st_size for p in env.adapter.iterdir())
    bound = sum(sorted(base_shards.values())[-2:]) + sum(out_sizes[-2:]) + adapter + small
    assert 0 < result.peak_disk_bytes <= bound < sum(base_shards.values()) + sum(out_sizes)
    assert budget < sum(base_shards.values()) + sum(out_sizes)
    assert result.disk_needed <= result.disk_budget == budget and result.peak_disk_bytes <= budget
    assert not list((tmp_path / "work").rglob("model-*.safetensors"))  # every shard was deleted once consumed

    # Byte progress for each stage, ending complete.
    for stage in ("download", "merge", "upload", "commit"):
        seen = [u for u in updates if u.stage == stage]
        assert seen and all(u.unit == "B" for u in seen), stage
        assert seen[-1].done == seen[-1].total > 0, stage
    # Upload bytes are counted as huggingface_hub reads the file (updates without a file message), not per file.
    assert any(u.message == "" and u.done for u in updates if u.stage == "upload")


def test_interrupted_push_leaves_no_commit_and_the_rerun_sends_only_what_is_missing(env: Env, tmp_path: Path) -> None:
    client = HubClient(ALICE, env.hub.url)
    target = client.preflight_push("alice/resumed", "new")
    env.hub.clear_log()
    env.hub.fail_uploads_after(50_000)  # a little over two output shards
    try:
        with pytest.raises(PushError, match="nothing was committed") as failed:
            stream_merge_push(_request(env), target, tmp_path / "work")
    finally:
        env.hub.fail_uploads_after(None)
    assert "Update existing repo" in str(failed.value)
    assert model_commits(env.hub, "alice/resumed") == []
    assert env.hub.repo_files("alice/resumed").keys() <= {".gitattributes"}
    sent_first = len(_lfs_puts(env.hub, 200))
    assert 1 <= sent_first and _lfs_puts(env.hub, 403)
    created = env.hub.commits("alice/resumed")  # the repository's creation only: the failed push committed nothing

    env.hub.clear_log()
    updates: list[ProgressUpdate] = []
    again = client.preflight_push("alice/resumed", "update")
    result = stream_merge_push(_request(env), again, tmp_path / "work", progress=updates.append)
    n_shards = len(result.report.shards)
    # Base shards the failed run had fetched but not yet consumed are read from its cache, not downloaded again.
    assert result.cached and sorted(result.cached + result.downloaded) == sorted(_shards(env.base))
    full_gets = [r for r in env.hub.requests_for("GET", "/model-000") if "range" not in {k.lower() for k in r.headers}]
    assert len(full_gets) == len(result.downloaded)
    assert any("already in the cache" in u.message for u in updates if u.stage == "download")
    assert len(result.already_on_hub) == sent_first and len(result.uploaded) == n_shards - sent_first
    assert len(_lfs_puts(env.hub)) == n_shards - sent_first  # only the missing shards crossed the wire
    assert len(model_commits(env.hub, "alice/resumed")) == 1
    assert len(env.hub.commits("alice/resumed")) == len(created) + 1
    assert any("already on the Hub" in u.message for u in updates if u.stage == "upload")
    files = env.hub.repo_files("alice/resumed")
    assert set(result.report.shards) <= set(files)


def test_the_budget_is_refused_below_the_pipeline_and_respected_at_it(env: Env, tmp_path: Path) -> None:
    target = HubClient(ALICE, env.hub.url).preflight_push("alice/tight", "new")
    env.hub.clear_log()
    with pytest.raises(DiskBudgetError, match="two input shards, two output shards") as refused:
        stream_merge_push(_request(env), target, tmp_path / "refused", max_disk=30_000)
    shard_reads = env.hub.requests_for("GET", "/model-000")
    assert shard_reads and all("range" in {k.lower() for k in r.headers} for r in shard_reads)  # headers only
    assert not HubClient(ALICE, env.hub.url).api.repo_exists("alice/tight")

    # Exactly the stated need: the pipeline runs (prefetching only where the budget allows) and stays inside it.
    needed = refused.value.needed
    result = stream_merge_push(_request(env), target, tmp_path / "work", max_disk=needed)
    assert needed < sum(_shards(env.base).values()) + result.report.output_bytes
    assert result.disk_needed == needed and 0 < result.peak_disk_bytes <= needed
    assert len(model_commits(env.hub, "alice/tight")) == 1


def test_update_replaces_stale_weights_and_a_pull_request_leaves_main_alone(env: Env, tmp_path: Path) -> None:
    env.hub.create_repo("alice/older")
    env.hub.add_files("alice/older", {"model-00001-of-00009.safetensors": b"stale", "notes.txt": b"kept"})
    client = HubClient(ALICE, env.hub.url)
    result = stream_merge_push(_request(env), client.preflight_push("alice/older", "pr"), tmp_path / "pr")
    on_main = set(env.hub.repo_files("alice/older")) - {".gitattributes"}
    assert result.push.pr_url and on_main == {"model-00001-of-00009.safetensors", "notes.txt"}
    stream_merge_push(_request(env), client.preflight_push("alice/older", "update"), tmp_path / "update")
    files = env.hub.repo_files("alice/older")
    assert "model-00001-of-00009.safetensors" not in files and "notes.txt" in files
    assert {n for n in files if n.startswith("model-")} == set(result.report.shards)


def test_cli_output_dash_streams_hub_to_hub(env: Env, capsys, monkeypatch) -> None:
    """The CLI streams when pushing without OUTPUT (or with '-'): no local copy, one commit, base + adapter."""
    from transformers import AutoModelForCausalLM

    from merge_core.cli import main as cli_main

    monkeypatch.setenv("HF_TOKEN", ALICE)
    head, args = ["-", "alice/sharded-lora"], ["--max-shard-size", SHARD, "--endpoint", env.hub.url, "--quiet"]
    assert cli_main([*head, "-", *args, "--push", "cli-streamed", "--max-disk", "10MB"]) == 0
    out = capsys.readouterr().out
    assert "pushed:" in out and "peak disk" in out
    assert len(model_commits(env.hub, "alice/cli-streamed")) == 1
    merged = AutoModelForCausalLM.from_pretrained("alice/cli-streamed", token=ALICE, dtype=torch.float32).eval()
    ids = prompt_ids()
    assert (logits(merged, ids) - logits(peft_reference(env.base, env.adapter), ids)).abs().max().item() <= 1e-4

    # No OUTPUT at all is the streamed push too; --verify checks each shard before it is committed.
    assert cli_main([*head, *args, "--push", "cli-verified", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verification: PASSED" in out and "merged = float64 reference rounded once" in out
    assert len(model_commits(env.hub, "alice/cli-verified")) == 1

    for extra, words in ([[], "or --push"], [["--push", "x", "--gguf", "q8_0"], "does not keep"]):
        assert cli_main([*head, *args, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


def test_streamed_verification_checks_each_shard_and_refuses_to_commit_a_bad_one(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = HubClient(ALICE, env.hub.url)
    updates: list[ProgressUpdate] = []
    result = stream_merge_push(
        _request(env),
        client.preflight_push("alice/verified", "new"),
        tmp_path / "ok",
        verify=True,
        progress=updates.append,
    )
    table = result.verification
    assert table is not None and table.passed, table.to_text()
    # Every adapted tensor (q, v and down of each layer) against the float64 reference, rounded once.
    assert {m.tensor for m in table.modules} == set(result.report.changed_tensors)
    assert all(m.bitwise_fraction == 1.0 for m in table.modules)
    assert "sampled" in table.check("merged = float64 reference rounded once").detail
    rows = {c.name: c for c in table.checks}
    assert (
        rows["untouched tensors bit-identical to base"].passed and rows["all tensors present with their shapes"].passed
    )
    _assert_function_rows_equal_the_whole_folder_rows(env.base, env.adapter, table, tmp_path)
    # The rows hold a base shard one more output shard when a layer straddles two: counted in the bound.
    tight = stream_merge_push(
        _request(env),
        client.preflight_push("alice/verified-tight", "new"),
        tmp_path / "tight",
        verify=True,
        max_disk=result.disk_needed,
    )
    assert tight.verification.passed and 0 < tight.peak_disk_bytes <= tight.disk_needed == result.disk_needed
    verify_bytes = [u for u in updates if u.stage == "verify"]
    assert verify_bytes and verify_bytes[-1].done == verify_bytes[-1].total
    card = env.hub.repo_files("alice/verified")["README.md"].decode()
    assert "## Verification" in card and "float64 reference" in card

    # A shard that is not what the math says (one flipped byte in a merged tensor): nothing is committed.
    _corrupt_second_shard(monkeypatch, result.report.shards[1])
    target = client.preflight_push("alice/refused", "new")
    with pytest.raises(StreamVerificationError, match="nothing was committed") as failed:
        stream_merge_push(_request(env), target, tmp_path / "bad", verify=True)
    assert not failed.value.report.passed
    assert model_commits(env.hub, "alice/refused") == []


def _assert_function_rows_equal_the_whole_folder_rows(base: Path, adapter: Path, table, tmp_path: Path) -> None:
    """The rows computed while the shards went by are layer_stream's rows on the whole merged folder."""
    from merge_core.layer_stream import streamed_logit_checks
    from merge_core.merge import merge_adapter
    from merge_core.options import MergeOptions
    from merge_core.plan import build_plan
    from merge_core.tasks import LOGIT_ROWS

    merge_adapter(base, adapter, tmp_path / "whole", MergeOptions())
    whole = streamed_logit_checks(build_plan(base, adapter, MergeOptions()), tmp_path / "whole")
    function = [c for c in table.checks if c.group == "function"]
    assert [c.name for c in function] == [c.name for c in whole] == LOGIT_ROWS
    for got, want in zip(function, whole, strict=True):
        if got.name == LOGIT_ROWS[2]:  # greedy decoding needs the whole model: said, not run
            assert got.passed is None and want.passed is None and "whole model" in got.detail
            continue
        assert got.passed is True and want.passed is True, (got, want)
        assert float(got.value.rstrip("%")) == pytest.approx(float(want.value.rstrip("%")), abs=1e-5)
    assert "layer by layer" in function[0].detail


def test_a_scaled_merged_tensor_fails_the_streamed_function_row_and_nothing_is_committed(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merge_core import stream_function
    from merge_core.safetensors_io import DTYPE_FROM_ST, read_header
    from merge_core.tasks import LOGIT_ROWS

    real = stream_function.StreamedFunctionRows.shard_written
    scaled: list[str] = []

    def scale_then_check(self, path: Path) -> None:
        # One layer's o_proj (which the adapter leaves alone) times 1.5, after the numerics rows read it:
        # only the function rows can see it.
        header = read_header(path)
        name = next((n for n in header.tensors if n.endswith("layers.1.self_attn.o_proj.weight")), None)
        if name is not None:
            info = header.tensors[name]
            with open(path, "r+b") as f:
                f.seek(info.begin)
                value = torch.frombuffer(bytearray(f.read(info.nbytes)), dtype=DTYPE_FROM_ST[info.dtype]) * 1.5
                f.seek(info.begin)
                f.write(value.numpy().tobytes())
            scaled.append(name)
        real(self, path)

    monkeypatch.setattr(stream_function.StreamedFunctionRows, "shard_written", scale_then_check)
    target = HubClient(ALICE, env.hub.url).preflight_push("alice/function-refused", "new")
    with pytest.raises(StreamVerificationError, match="nothing was committed") as failed:
        stream_merge_push(_request(env), target, tmp_path / "work", verify=True)
    assert scaled
    table = failed.value.report
    failed_rows = table.failed()
    assert LOGIT_ROWS[0] in [c.name for c in failed_rows] and {c.group for c in failed_rows} == {"function"}
    assert float(table.check(LOGIT_ROWS[0]).value) > 1e-3
    assert model_commits(env.hub, "alice/function-refused") == []


def _corrupt_second_shard(monkeypatch: pytest.MonkeyPatch, shard: str) -> None:
    """Flip one bit of a merged tensor in ``shard`` just before the streamed check reads it."""
    from merge_core import verify_stream
    from merge_core.safetensors_io import read_header

    real = verify_stream.ShardVerifier.shard_written

    def corrupt_then_check(self, path: Path) -> None:
        if path.name == shard:
            header = read_header(path)
            name = next(n for n in header.tensors if "proj" in n)
            with open(path, "r+b") as f:
                f.seek(header.tensors[name].begin + 1)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0x40]))
        real(self, path)

    monkeypatch.setattr(verify_stream.ShardVerifier, "shard_written", corrupt_then_check)


def test_cli_streamed_verification_failure_exits_1_with_the_table(env: Env, capsys, monkeypatch) -> None:
    from merge_core.cli import main as cli_main

    monkeypatch.setenv("HF_TOKEN", ALICE)
    shards = sorted(_shards(env.base))  # the output keeps the base's shard layout and names here
    _corrupt_second_shard(monkeypatch, shards[1])
    args = ["-", "alice/sharded-lora", "--max-shard-size", SHARD, "--endpoint", env.hub.url, "--quiet"]
    assert cli_main([*args, "--push", "cli-refused", "--verify"]) == 1
    captured = capsys.readouterr()
    assert "verification: FAILED" in captured.out and "nothing was committed" in captured.err
    assert "Traceback" not in captured.err and model_commits(env.hub, "alice/cli-refused") == []


def test_streamed_checks_sample_first_last_and_evenly_spaced_rows() -> None:
    from merge_core.verify_stream import SAMPLE_ROWS, SAMPLE_WINDOWS, sampled_rows

    windows = sampled_rows(5120, 800)
    assert windows[0] == (0, SAMPLE_ROWS) and windows[-1] == (5120 - SAMPLE_ROWS, 5120)
    assert len(windows) == SAMPLE_WINDOWS and all(b - a == SAMPLE_ROWS for a, b in windows)
    assert sampled_rows(SAMPLE_WINDOWS * SAMPLE_ROWS, 800) == [(0, SAMPLE_WINDOWS * SAMPLE_ROWS)]  # small: every row


def _upload_pair(env: Env, tmp: Path, name: str, base: Path) -> MergeRequest:
    upload_pair(
        env.hub,
        base,
        tmp / f"{name}-adapter",
        base_repo=f"acme/{name}",
        adapter_repo=f"alice/{name}-lora",
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    return MergeRequest(adapter=f"alice/{name}-lora", token=ALICE, endpoint=env.hub.url, max_shard_size=SHARD)


def _move_to_last_shard(base: Path, tensor: str) -> None:
    """Rewrite a sharded checkpoint so ``tensor`` is stored in its last shard, far from its layer."""
    from safetensors.torch import load_file, save_file

    index_file = base / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first, last = index["weight_map"][tensor], sorted(set(index["weight_map"].values()))[-1]
    state = load_file(base / first)
    moved = state.pop(tensor)
    save_file(state, base / first, metadata={"format": "pt"})
    save_file({**load_file(base / last), tensor: moved}, base / last, metadata={"format": "pt"})
    index["weight_map"][tensor] = last
    index_file.write_text(json.dumps(index))


def test_streamed_rows_keep_a_tied_head_in_memory_and_skip_a_layer_spread_over_the_checkpoint(
    env: Env, tmp_path: Path
) -> None:
    from merge_core.tasks import LOGIT_ROWS

    client = HubClient(ALICE, env.hub.url)
    # Tied: the head runs last but is the embedding matrix of the first shard, copied to RAM before it goes.
    tied = make_base(tmp_path / "tied", "qwen2", tie=True, max_shard_size=SHARD)
    request = _upload_pair(env, tmp_path, "tied-qwen", tied)
    result = stream_merge_push(request, client.preflight_push("alice/tied", "new"), tmp_path / "t", verify=True)
    assert not any(
        "lm_head" in n for n in json.loads((tied / "model.safetensors.index.json").read_text())["weight_map"]
    )
    _assert_function_rows_equal_the_whole_folder_rows(
        tied, tmp_path / "tied-qwen-adapter", result.verification, tmp_path
    )

    # Layer 0's q_proj stored in the last shard: layer 0 cannot run until the end, and every layer after it
    # would have to wait in memory. The rows say so, the other rows still decide, and the push lands.
    spread = make_base(tmp_path / "spread", "llama", max_shard_size=SHARD)
    _move_to_last_shard(spread, "model.layers.0.self_attn.q_proj.weight")
    request = _upload_pair(env, tmp_path, "spread-llama", spread)
    result = stream_merge_push(request, client.preflight_push("alice/spread", "new"), tmp_path / "s", verify=True)
    function = [c for c in result.verification.checks if c.group == "function"]
    assert [c.name for c in function] == LOGIT_ROWS
    assert all(c.passed is None and "beyond the streamed window" in c.detail for c in function), function
    assert result.verification.passed and len(model_commits(env.hub, "alice/spread")) == 1
