"""Reliability catalogue, front side (CLI and app): refusals come before any work, as exit code 2
and ONE sentence (never a traceback), the inputs stay byte-identical, and nothing is left behind
in the output's parent or the temp folder.

The engine side (executor, staging, finiteness) is tests/test_reliability.py.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import app
from merge_core import cli
from merge_core.locks import claim
from merge_core.workdirs import WORKDIR_PREFIX
from tests.conftest import HUB_PORT
from tests.factories import make_adapter, make_base
from tests.hubserver import HubServer
from tests.test_reliability import leftovers, tree_hash

REPO = Path(__file__).resolve().parents[1]
ALICE = "hf_alice_front_write_token_0123456789"
ALICE_READ = "hf_alice_front_read_token_0123456789"


@dataclass
class Inputs:
    root: Path
    base: Path
    adapter: Path

    def hashes(self) -> tuple[str, str]:
        return tree_hash(self.base), tree_hash(self.adapter)


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    root = tmp_path / "models"
    base = make_base(root / "base", "llama")
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])
    return Inputs(root, base, adapter)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main([*args, "--quiet"])
    err = capsys.readouterr().err
    return code, err


def assert_one_sentence(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in err, err


# --- outputs that would destroy an input: refused before any work, with and without --overwrite ---------

UNSAFE: dict[str, tuple[Callable[[Inputs], Path], str]] = {
    "output is the base": (lambda i: i.base, "is the base model"),
    "output is the adapter": (lambda i: i.adapter, "is an adapter"),
    "output is a parent of the base": (lambda i: i.root, "contains the base model"),
    "output inside the base": (lambda i: i.base / "merged", "lies inside the base model"),
    "output inside the adapter": (lambda i: i.adapter / "merged", "lies inside an adapter"),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", list(UNSAFE))
def test_output_touching_an_input_is_refused(inputs: Inputs, capsys, case: str, overwrite: bool) -> None:
    where, words = UNSAFE[case]
    before = inputs.hashes()
    output = where(inputs)
    code, err = run_cli(
        [str(inputs.base), str(inputs.adapter), str(output)] + (["--overwrite"] if overwrite else []), capsys
    )
    assert code == 2
    assert_one_sentence(err, words, "Choose an output folder outside every input")
    assert inputs.hashes() == before
    assert leftovers(output.parent if output.parent.exists() else inputs.root) == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_symlink_to_the_base_is_refused(inputs: Inputs, tmp_path: Path, capsys, overwrite: bool) -> None:
    link = tmp_path / "out-link"
    link.symlink_to(inputs.base, target_is_directory=True)
    before = inputs.hashes()
    code, err = run_cli(
        [str(inputs.base), str(inputs.adapter), str(link)] + (["--overwrite"] if overwrite else []), capsys
    )
    assert code == 2
    assert_one_sentence(err, "is the base model")
    assert inputs.hashes() == before and link.is_symlink() and os.readlink(link) == str(inputs.base)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("inside", [False, True], ids=["the-cache", "inside-the-cache"])
def test_the_hub_cache_is_never_an_output(inputs: Inputs, capsys, inside: bool) -> None:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    output = cache / "models--x--y" if inside else cache
    code, err = run_cli([str(inputs.base), str(inputs.adapter), str(output), "--overwrite"], capsys)
    assert code == 2
    assert_one_sentence(err, "the Hub cache that holds the downloaded inputs")
    assert not (cache / "models--x--y").exists() and cache.is_dir()


# --- invalid options and what the operating system refuses: exit 2, one sentence --------------------------

BAD_ARGS: dict[str, tuple[Callable[[Inputs, Path], list[str]], list[str]]] = {
    "shard size 1e400GB": (
        lambda i, o: [str(i.base), str(i.adapter), str(o), "--max-shard-size", "1e400GB"],
        ["shard size '1e400GB' is out of range"],
    ),
    "shard size nonsense": (
        lambda i, o: [str(i.base), str(i.adapter), str(o), "--max-shard-size", "lots"],
        ["Cannot read the size 'lots'"],
    ),
    "device meta": (
        lambda i, o: [str(i.base), str(i.adapter), str(o), "--device", "meta"],
        ["cannot run on device 'meta'"],
    ),
    "device nonsense": (
        lambda i, o: [str(i.base), str(i.adapter), str(o), "--device", "gpu9"],
        ["Unknown device 'gpu9'"],
    ),
    "adapter of 10,000 characters": (
        lambda i, o: [str(i.base), "a" * 10_000, str(o)],
        ["neither a local folder nor a Hub model ID"],
    ),
    "adapter path with a name too long": (
        lambda i, o: [str(i.base), "/tmp/" + "a" * 300, str(o)],
        ["name is too long for the filesystem"],
    ),
    "base path with a name too long": (
        lambda i, o: ["./" + "b" * 300, str(i.adapter), str(o)],
        ["name is too long for the filesystem"],
    ),
    "output name too long": (
        lambda i, o: [str(i.base), str(i.adapter), str(o.parent / ("o" * 300))],
        ["name is too long for the filesystem"],
    ),
    "output under a file": (
        lambda i, o: [str(i.base), str(i.adapter), str(i.base / "config.json" / "out")],
        ["lies inside the base model"],
    ),
}
if not torch.cuda.is_available():
    BAD_ARGS["device cuda without CUDA"] = (
        lambda i, o: [str(i.base), str(i.adapter), str(o), "--device", "cuda"],
        ["no usable CUDA GPU", "--device cpu"],
    )


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_argument_is_one_sentence_and_exit_2(inputs: Inputs, tmp_path: Path, capsys, case: str) -> None:
    args, words = BAD_ARGS[case]
    output = tmp_path / "out" / "merged"
    output.parent.mkdir()
    before = inputs.hashes()
    code, err = run_cli(args(inputs, output), capsys)
    assert code == 2
    assert_one_sentence(err, *words)
    assert inputs.hashes() == before
    assert list(output.parent.iterdir()) == [] and leftovers(inputs.root) == []


@pytest.mark.parametrize(
    "code_name, words",
    [("ENOSPC", "the disk is full"), ("EROFS", "filesystem is read-only"), ("EACCES", "permission denied")],
)
def test_an_os_error_while_writing_is_one_sentence(
    inputs: Inputs, tmp_path: Path, capsys, monkeypatch, code_name: str, words: str
) -> None:
    import merge_core.pipeline

    code = getattr(errno, code_name)

    def refuse(plan, output_dir, **kwargs):
        raise OSError(code, os.strerror(code), str(output_dir))

    monkeypatch.setattr(merge_core.pipeline, "execute_plan", refuse)
    before = inputs.hashes()
    exit_code, err = run_cli([str(inputs.base), str(inputs.adapter), str(tmp_path / "merged")], capsys)
    assert exit_code == 2
    assert_one_sentence(err, words, str(tmp_path / "merged"))
    assert inputs.hashes() == before and leftovers(tmp_path) == []


# --- replacing a file or a link, and what killed runs left ---------------------------------------------


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_existing_file_or_link_is_replaced_cleanly(inputs: Inputs, tmp_path: Path, capsys, kind: str) -> None:
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    output = tmp_path / "merged"
    if kind == "file":
        output.write_text("old")
    else:
        output.symlink_to(other, target_is_directory=True)
    code, err = run_cli([str(inputs.base), str(inputs.adapter), str(output), "--overwrite"], capsys)
    assert code == 0, err
    assert output.is_dir() and not output.is_symlink() and (output / "config.json").is_file()
    assert (other / "keep.txt").read_text() == "keep"
    assert leftovers(tmp_path) == []


def test_leftovers_of_a_killed_combination_are_removed(inputs: Inputs, tmp_path: Path, capsys) -> None:
    dead = tmp_path / ".combined-adapter-deadbeef"
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"x" * 100)
    live = claim(tmp_path / ".combined-adapter-livelive")  # a merge still running beside us
    try:
        code, err = run_cli(
            [
                str(inputs.base),
                f"{inputs.adapter}:0.5,{inputs.adapter}:0.5",
                str(tmp_path / "m"),
                "--combine",
                "linear",
            ],
            capsys,
        )
        assert code == 0, err
        assert not dead.exists() and live.folder.is_dir()
    finally:
        live.release(remove_folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "models"]


def test_sigkill_mid_merge_then_the_next_run_leaves_nothing(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", "llama", hidden=256, intermediate=1024, layers=6)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    output = tmp_path / "out" / "merged"
    args = [
        sys.executable,
        "-m",
        "merge_core",
        str(base),
        str(adapter),
        str(output),
        "--quiet",
        "--max-shard-size",
        "200KB",
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(output.parent.glob(".merged.partial-*/*.safetensors")):
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the merge finished before it could be killed; make the model bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(output.parent.glob(".merged.partial-*")), "the kill left no staging folder to clean up"
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in output.parent.iterdir()) == ["merged"]


# --- push preflight: refused before anything is downloaded or merged -------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("front-hub")
    base = make_base(root / "base", "llama")
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj"])
    server = HubServer(root / "hub", port=HUB_PORT).start()
    server.add_user("alice", ALICE, write=True, orgs=["alice-org"])
    server.add_user("alice", ALICE_READ, write=False)
    for repo, folder in [("acme/tiny-llama", base), ("alice/tiny-lora", adapter), ("alice/taken", adapter)]:
        server.create_repo(repo)
        server.upload_dir(repo, folder)
    yield server
    server.stop()


PUSH_REFUSALS = {
    "read-only token": (ALICE_READ, ["alice/new-merge"], ["read-only"]),
    "no token": ("", ["alice/new-merge"], ["Log in"]),
    "target exists (new)": (ALICE, ["alice/taken"], ["alice/taken already exists"]),
    "target missing (update)": (ALICE, ["alice/missing", "--push-mode", "update"], ["does not exist"]),
    "foreign namespace": (ALICE, ["acme/not-mine"], ["cannot write to the namespace 'acme'", "alice-org"]),
    "bad repo name": (ALICE, ["alice/" + "x" * 200], ["not a repository name the Hub accepts"]),
}


@pytest.mark.parametrize("case", list(PUSH_REFUSALS))
def test_push_refused_before_any_download(hub: HubServer, tmp_path: Path, capsys, monkeypatch, case: str) -> None:
    token, push_args, words = PUSH_REFUSALS[case]
    monkeypatch.setenv("HF_TOKEN", token)
    if not token:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(cli, "_token", lambda: None)
    hub.clear_log()
    code, err = run_cli(
        ["acme/tiny-llama", "alice/tiny-lora", str(tmp_path / "merged"), "--endpoint", hub.url, "--push", *push_args],
        capsys,
    )
    assert code == 2
    assert_one_sentence(err, *words)
    if token:
        assert token not in err
    downloads = [r.path for r in hub.request_log if "/resolve/" in r.path or "/api/models/acme" in r.path]
    assert downloads == [] and list(tmp_path.iterdir()) == []


def test_push_preflight_passes_then_the_merge_lands_in_one_commit(
    hub: HubServer, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", ALICE)
    code, err = run_cli(
        [
            "acme/tiny-llama",
            "alice/tiny-lora",
            str(tmp_path / "merged"),
            "--endpoint",
            hub.url,
            "--push",
            "alice-org/front-merge",
        ],
        capsys,
    )
    assert code == 0, err
    assert "model.safetensors" in hub.repo_files("alice-org/front-merge")


# --- the app: limits, long fields, one merge per session, claimed folders --------------------------------


@pytest.fixture
def tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "tempdir"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def app_merge(session: str | None = None, **form) -> app.MergeView:
    values = dict(adapter="demo/adapter", base="demo/base", prompt="Hello", max_new_tokens=8, functional="never")
    return app.merge(app.MergeForm(**{**values, **form}), session=session)


APP_REFUSALS = {
    "adapter of 10,000 characters": (dict(adapter="a" * 10_000), ["'Adapter' has 10,000 characters", "limit is 1,000"]),
    "base of 5,000 characters": (dict(base="b/" + "c" * 4_998), ["'Base model' has 5,000 characters"]),
    "prompt of 100,000 characters": (dict(prompt="p" * 100_000), ["prompt has 100,000 characters", "limit is 2,000"]),
    "10,000 new tokens": (dict(max_new_tokens=10_000), ["between 1 and 256"]),
    "adapter name too long for the filesystem": (dict(adapter="a" * 300), ["neither a local folder nor a Hub"]),
    "adapter path too long for the filesystem": (dict(adapter="/" + "a" * 300), ["is a local path"]),
    "shard size 1e400GB": (dict(max_shard_size="1e400GB"), ["out of range"]),
}


@pytest.mark.parametrize("case", list(APP_REFUSALS))
def test_app_refusals_state_their_limit(tempdir: Path, case: str) -> None:
    form, words = APP_REFUSALS[case]
    view = app_merge(**form)
    message = view.error["value"]
    assert view.state is None and view.error["visible"] is True
    assert "Unexpected error" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message
    assert list(tempdir.iterdir()) == []


def test_app_second_merge_in_a_session_is_refused(tempdir: Path) -> None:
    with app.pipeline.session_slot("session-1"):  # a merge of this session is running
        view = app_merge(session="session-1")
    assert view.state is app.pipeline.KEEP and "already running in this session (limit: 1" in view.error["value"]
    assert list(tempdir.iterdir()) == []
    other = app_merge(session="session-2")  # other sessions are not affected
    assert isinstance(other.state, app.MergeResult), other.error
    app.discard(other.state)
    assert list(tempdir.iterdir()) == []


def test_app_sweeps_folders_of_dead_processes_only(tempdir: Path) -> None:
    dead = tempdir / f"{WORKDIR_PREFIX}dead"
    (dead / "merged").mkdir(parents=True)
    live = claim(tempdir / f"{WORKDIR_PREFIX}live")
    other = tempdir / "lms-hf-home-not-ours"
    other.mkdir()
    try:
        app.build_demo()  # start-up sweep
        assert not dead.exists() and live.folder.is_dir() and other.is_dir()
        dead.mkdir()
        view = app_merge()  # and each request sweeps again
        assert isinstance(view.state, app.MergeResult), view.error
        assert not dead.exists() and live.folder.is_dir()
        app.discard(view.state)
    finally:
        live.release(remove_folder=True)
    assert sorted(p.name for p in tempdir.iterdir()) == [other.name]
