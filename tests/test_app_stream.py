"""The app's streamed mode ('Merge straight to my Hub repo') and the push with byte progress, against the
local Hub test server: through merge_core.pipeline and through the app's handler."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import app
from merge_core import pipeline
from merge_core.errors import DiskBudgetError
from merge_core.inputs import MergeRequest
from merge_core.progress import ProgressUpdate
from tests.conftest import ALICE, ALICE_READ
from tests.sharded_hub import SHARD, Env, model_commits, sharded_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    env = sharded_env(tmp_path_factory.mktemp("app-stream"), target_modules=["q_proj", "v_proj"])
    yield env
    env.hub.stop()


def _form(**changes: Any) -> pipeline.MergeForm:
    return pipeline.MergeForm(adapter="alice/sharded-lora", max_shard_size=SHARD, prompt="w5 w6", **changes)


class Recorder:
    """A gr.Progress stand-in: every (fraction, desc) it was shown."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str]] = []

    def __call__(self, fraction: Any, desc: str = "", **_: Any) -> None:
        self.calls.append((fraction, desc))


def test_push_of_a_merged_folder_reports_bytes_as_they_go_in_one_commit(env: Env, tmp_path: Path) -> None:
    request = MergeRequest(adapter=str(env.adapter), base=str(env.base), max_shard_size=SHARD)
    result = pipeline.run_merge(request, tmp_path / "work")
    shards = sorted(p.name for p in result.output_dir.glob("model-*.safetensors"))
    assert len(shards) >= 4
    updates: list[ProgressUpdate] = []
    env.hub.clear_log()
    pushed = pipeline.push_merged(result, "alice/progress", token=ALICE, endpoint=env.hub.url, progress=updates.append)
    result.release()

    files = {p.name: p.stat().st_size for p in result.output_dir.iterdir()}  # the merged folder is kept
    uploads = [u for u in updates if u.stage == "upload"]
    done = [u.done for u in uploads]
    assert done == sorted(done) and uploads[-1].done == uploads[-1].total == sum(files.values())
    # Byte-level: more distinct steps than files, and the last step is the commit (not the last upload).
    assert len(set(done)) > len(shards) + 1 and any("committing" in u.message for u in uploads)
    assert max(u.done for u in uploads if "committing" not in u.message and "committed" not in u.message) < done[-1]
    assert len(model_commits(env.hub, "alice/progress")) == 1 and len(pushed.commit_oid) == 40
    assert len([r for r in env.hub.requests_for("PUT", "/lfs-upload/") if r.status == 200]) == len(shards)
    on_hub = env.hub.repo_files("alice/progress")
    assert {n: len(on_hub[n]) for n in files} == files

    # The app shows the same bytes through gr.Progress: fractions never go back and end at 1.
    shown = Recorder()
    display = pipeline.progress_adapter(shown)
    for update in uploads:
        display(update)
    fractions = [f for f, _ in shown.calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and "Uploading … " in shown.calls[-1][1]
    assert "committed" in shown.calls[-1][1]


def test_streamed_merge_from_the_app_lands_one_commit_with_link_and_snippets(env: Env, tmp_path: Path) -> None:
    # The pipeline function: the push settings up front, the result as text for the page.
    progress = Recorder()
    done = pipeline.stream_to_hub(
        _form(token=ALICE, repo_name="streamed-app"),
        pipeline.StreamForm(private=False, push_mode="Create new repo"),
        token=ALICE,
        local=app.LOCAL,
        owner="alice",
        progress=pipeline.stream_progress(progress),
    )
    assert len(model_commits(env.hub, "alice/streamed-app")) == 1
    assert {"model.safetensors.index.json", "config.json", "README.md"} <= set(env.hub.repo_files("alice/streamed-app"))
    assert f"[alice/streamed-app]({env.hub.url}/alice/streamed-app)" in done.push_result
    assert "vllm serve alice/streamed-app" in done.push_result and "from_pretrained" in done.push_result
    assert "pushed straight to alice/streamed-app" in done.verdict and "peak disk" in done.verdict
    # Checked shard by shard while the base shards were still on disk: the numerics rows ran and passed.
    assert done.verification is not None and done.verification.passed
    assert any(c.group == "numerics" and c.passed for c in done.verification.checks)
    assert "checks passed" in done.verdict
    assert "No sample generation" in done.gen_note and "not kept on this Space" in done.gen_note
    assert f"{len(done.result.report.shards)} shard(s) uploaded" in done.summary
    fractions = [f for f, _ in progress.calls]
    assert fractions[-1] == pytest.approx(1.0) and all(0 <= f <= 1 for f in fractions)
    assert any("download" in d and "upload" in d and "GB" in d for _, d in progress.calls)

    # The app's handler: the owner from the token, the page's fields, the push result shown.
    view, pushed = app.merge_to_hub(_form(token=ALICE, repo_name="streamed-page"), pipeline.StreamForm())
    assert view.error["visible"] is False and pushed["visible"] is True
    assert "alice/streamed-page" in pushed["value"] and view.state is None
    assert view.push_btn["interactive"] is False and view.gen_merged == "" and "No sample" in view.gen_note
    assert len(model_commits(env.hub, "alice/streamed-page")) == 1


def test_streamed_merge_refuses_bad_targets_before_any_download(env: Env) -> None:
    env.hub.clear_log()
    for form, token, words in [
        (_form(repo_name="alice/read-only"), ALICE_READ, "read-only"),
        (_form(repo_name="acme/not-mine"), ALICE, "acme"),
        (_form(repo_name=""), ALICE, "fill in Target repo"),
        (_form(repo_name="alice/no-token"), "", "write token"),
    ]:
        view, pushed = app.merge_to_hub(replace(form, token=token), pipeline.StreamForm())
        assert words in view.error["value"], view.error
        assert pushed["visible"] is False and view.merge_btn["interactive"] is True
    assert not env.hub.requests_for("GET", "/model-000")  # no base shard (nor its header) was read
    assert not env.hub.requests_for("GET", "/sharded-lora/")

    # A budget even the streamed pipeline cannot fit: the app's sentence (no CLI flags), after headers only.
    with pytest.raises(DiskBudgetError, match="Even streamed, this merge needs about") as refused:
        pipeline.stream_to_hub(
            _form(repo_name="alice/too-tight"), pipeline.StreamForm(), token=ALICE, local=app.LOCAL, max_disk=30_000
        )
    assert "--max-disk" not in str(refused.value) and "30.00 KB to spare" in str(refused.value)
    shard_reads = env.hub.requests_for("GET", "/model-000")
    assert shard_reads and all("range" in {k.lower() for k in r.headers} for r in shard_reads)


def test_a_merge_too_large_for_the_disk_stops_before_the_download_and_names_the_streamed_mode(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    base_bytes = sum(p.stat().st_size for p in env.base.glob("*.safetensors"))
    # Room for the base or for the merged copy (64 MB is check_disk's margin), not for both: a Space's 50 GB
    # against a 13B model's 26 GB download plus its 26 GB merged copy, in small.
    free = (64 << 20) + base_bytes * 3 // 2
    usage = shutil._ntuple_diskusage(10**12, 10**12 - free, free)  # type: ignore[attr-defined]
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage)
    env.hub.clear_log()
    view = app.merge(_form(token=ALICE), progress=None)
    message = view.error["value"]
    assert "acme/sharded-llama and the merged model together" in message and "GB" in message, message
    assert pipeline.STREAM_BUTTON in message and "two base shards" in message
    shard_gets = env.hub.requests_for("GET", "/model-000")
    assert shard_gets and all("range" in {k.lower() for k in r.headers} for r in shard_gets)  # headers only
    assert pipeline.disk_hint(ValueError("other")) == ""


def test_stream_progress_is_one_bar_over_three_stages_with_an_eta() -> None:
    shown, now = Recorder(), [0.0]
    callback = pipeline.stream_progress(shown, clock=lambda: now[0])
    callback(ProgressUpdate("resolve", 1, 2, "", "base"))
    assert shown.calls == [(0.0, "Resolving inputs … (base)")]
    for step in range(1, 11):
        for i, stage in enumerate(("download", "merge", "upload")):
            now[0] = step * 10.0 + i  # each update a second apart: none is throttled
            callback(ProgressUpdate(stage, step * 1e8, 1e9, "B"))
    assert shown.calls[-1][0] < 1.0  # every byte sent, but nothing is in the repo before the commit
    now[0] += 1.0
    callback(ProgressUpdate("verify", 5, 10, "B", "model-00001-of-00002.safetensors"))
    callback(ProgressUpdate("commit", 0, 100, "B", "one commit"))
    callback(ProgressUpdate("commit", 100, 100, "B", "committed 0123456789ab"))
    fractions = [f for f, _ in shown.calls]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert "committed 0123456789ab" in shown.calls[-1][1]
    assert "download 0.50/1.00 GB · merge 0.50/1.00 GB · upload 0.50/1.00 GB · about 52 s left" in [
        d for _, d in shown.calls
    ]


def test_progress_sent_from_pipeline_threads_reaches_the_handlers_event() -> None:
    """gr.Progress looks its event up in context variables (LocalContext); upload and download threads do
    not inherit them, so the app binds each call to the handler's context."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    event = contextvars.ContextVar("event")
    event.set("event-1")
    seen: list[str | None] = []

    def show(*_: Any, **__: Any) -> None:
        seen.append(event.get(None))

    bound = pipeline.in_caller_context(show)  # in the handler's thread, as app.py's handlers do
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: show(0.5), range(2)))  # unbound: the threads see no event
        list(pool.map(lambda _: bound(0.5), range(4)))
    assert seen == [None, None] + ["event-1"] * 4


def test_cli_push_shows_the_upload_bytes_in_tqdm_and_lands_one_commit(
    env: Env, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merge_core.cli import main as cli_main

    monkeypatch.setenv("HF_TOKEN", ALICE)
    out = tmp_path / "merged"
    args = [str(env.base), str(env.adapter), str(out), "--max-shard-size", SHARD, "--endpoint", env.hub.url]
    assert cli_main([*args, "--push", "alice/cli-progress"]) == 0
    err = capsys.readouterr().err
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    bars = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("upload")]
    assert bars and "100%" in bars[-1] and "committed" in bars[-1], bars[-3:]
    assert len({b.split("|")[0] for b in bars}) > 2  # the bar moved through intermediate values
    assert f"{total / 1024:.0f}k" in bars[-1] or f"{total / 1024:.1f}k" in bars[-1], (total, bars[-1])
    assert len(model_commits(env.hub, "alice/cli-progress")) == 1
