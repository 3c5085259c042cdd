"""Reliability catalogue, engine side: inputs are never modified, an exit-0 output is finite,
a failure leaves nothing behind and says what to do in one sentence.

Each case asserts the exact outcome: the exception class and its message, the inputs hashed
byte-identical before and after, and no leftover in the output's parent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_core.safetensors_io
from merge_core import MergeOptions, merge_adapter
from merge_core.errors import (
    InvalidOptionError,
    MergeError,
    NonFiniteOutputError,
    OutputExistsError,
    OutputWriteError,
    UnsafeOutputError,
)
from merge_core.locks import claim
from merge_core.outputs import sweep_leftovers
from tests.factories import make_adapter, make_base

REPO = Path(__file__).resolve().parents[1]


def tree_hash(path: Path) -> str:
    """Names, link targets and bytes of everything under ``path`` (links are not followed)."""
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode())
        if p.is_symlink():
            digest.update(os.readlink(p).encode())
        elif p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".lock")
    )


@dataclass
class Inputs:
    root: Path
    base: Path
    adapter: Path

    def hashes(self) -> tuple[str, str]:
        return tree_hash(self.base), tree_hash(self.adapter)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("pristine")
    base = make_base(root / "base", "llama")
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])
    return Inputs(root, base, adapter)


@pytest.fixture
def inputs(tmp: Path, pristine: Inputs) -> Inputs:
    """A private copy per test: a case that wrongly destroyed its inputs cannot harm the next one."""
    shutil.copytree(pristine.base, tmp / "models" / "base")
    shutil.copytree(pristine.adapter, tmp / "models" / "adapter")
    return Inputs(tmp / "models", tmp / "models" / "base", tmp / "models" / "adapter")


def expect_refusal(inputs: Inputs, output: Path, error: type[MergeError], match: str, **kwargs) -> None:
    before = inputs.hashes()
    parent_before = sorted(p.name for p in output.parent.iterdir()) if output.parent.is_dir() else None
    with pytest.raises(error, match=match) as info:
        merge_adapter(inputs.base, inputs.adapter, output, **kwargs)
    assert "\n" not in str(info.value)
    assert inputs.hashes() == before
    if parent_before is not None:
        assert sorted(p.name for p in output.parent.iterdir()) == parent_before


# --- 1. outputs that would touch an input ---------------------------------------------------------------


def _output_is_base(i: Inputs) -> Path:
    return i.base


def _output_is_adapter(i: Inputs) -> Path:
    return i.adapter


def _output_parent_of_base(i: Inputs) -> Path:
    return i.root


def _output_inside_base(i: Inputs) -> Path:
    return i.base / "merged"


def _output_inside_adapter(i: Inputs) -> Path:
    return i.adapter / "sub" / "merged"


def _output_link_to_base(i: Inputs) -> Path:
    link = i.root.parent / "link-to-base"
    link.symlink_to(i.base, target_is_directory=True)
    return link


def _output_through_link_into_adapter(i: Inputs) -> Path:
    link = i.root.parent / "link-to-adapter"
    link.symlink_to(i.adapter, target_is_directory=True)
    return link / "merged"


def _output_relative_dots_to_base(i: Inputs) -> Path:
    return i.adapter / ".." / "base"


UNSAFE_OUTPUTS: dict[str, tuple[Callable[[Inputs], Path], str]] = {
    "is the base": (_output_is_base, "is the base model"),
    "is the adapter": (_output_is_adapter, "is the adapter"),
    "a parent of the base": (_output_parent_of_base, "contains the base model"),
    "inside the base": (_output_inside_base, "lies inside the base model"),
    "inside the adapter": (_output_inside_adapter, "lies inside the adapter"),
    "a symlink to the base": (_output_link_to_base, "is the base model"),
    "through a symlink into the adapter": (_output_through_link_into_adapter, "lies inside the adapter"),
    "dots leading to the base": (_output_relative_dots_to_base, "is the base model"),
}


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
@pytest.mark.parametrize("case", list(UNSAFE_OUTPUTS))
def test_output_touching_an_input_is_refused(inputs: Inputs, case: str, overwrite: bool) -> None:
    make_output, relation = UNSAFE_OUTPUTS[case]
    output = make_output(inputs)
    expect_refusal(
        inputs,
        output,
        UnsafeOutputError,
        f"{relation}.*Choose an output folder outside every input",
        overwrite=overwrite,
    )


def test_output_in_the_folder_that_really_holds_the_shards_is_refused(inputs: Inputs, tmp: Path) -> None:
    """Hub snapshots are links into a blob folder: writing over the blobs would destroy the base."""
    blobs = tmp / "blobs"
    blobs.mkdir()
    shard = inputs.base / "model.safetensors"
    shard.rename(blobs / "model.safetensors")
    shard.symlink_to(blobs / "model.safetensors")
    expect_refusal(inputs, blobs, UnsafeOutputError, "folder holding the inputs' files", overwrite=True)


# --- 2. replacing what is at the output path ------------------------------------------------------------


def _existing_file(tmp: Path) -> Path:
    (tmp / "merged").write_text("an unrelated file")
    return tmp / "merged"


def _existing_link_to_folder(tmp: Path) -> Path:
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "keep.txt").write_text("keep me")
    (tmp / "merged").symlink_to(tmp / "elsewhere", target_is_directory=True)
    return tmp / "merged"


def _existing_dangling_link(tmp: Path) -> Path:
    (tmp / "merged").symlink_to(tmp / "nowhere")
    return tmp / "merged"


def _existing_folder(tmp: Path) -> Path:
    (tmp / "merged").mkdir()
    (tmp / "merged" / "stale.txt").write_text("old")
    return tmp / "merged"


@pytest.mark.parametrize(
    "make_existing", [_existing_file, _existing_link_to_folder, _existing_dangling_link, _existing_folder]
)
def test_overwrite_replaces_what_is_there_cleanly(inputs: Inputs, tmp: Path, make_existing) -> None:
    output = make_existing(tmp)
    before = inputs.hashes()
    merge_adapter(inputs.base, inputs.adapter, output, overwrite=True)
    assert output.is_dir() and not output.is_symlink()
    assert (output / "model.safetensors").is_file() and not (output / "stale.txt").exists()
    assert inputs.hashes() == before
    assert leftovers(tmp) == []
    if (tmp / "elsewhere").exists():
        assert (tmp / "elsewhere" / "keep.txt").read_text() == "keep me"  # the link went, not its target


@pytest.mark.parametrize("make_existing", [_existing_file, _existing_link_to_folder, _existing_folder])
def test_existing_output_without_overwrite_is_left_alone(inputs: Inputs, tmp: Path, make_existing) -> None:
    output = make_existing(tmp)
    expect_refusal(inputs, output, OutputExistsError, "already exists.*--overwrite")


# --- 3. outputs that cannot be written -----------------------------------------------------------------


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """A folder nobody may write into, root included (immutable attribute), or plain chmod for users."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_read_only_location(inputs: Inputs, tmp: Path) -> None:
    locked = tmp / "locked"
    locked.mkdir()
    with read_only(locked):
        expect_refusal(inputs, locked / "merged", OutputWriteError, "not permitted|permission denied")
    assert list(locked.iterdir()) == []


def test_name_too_long_for_the_filesystem(inputs: Inputs, tmp: Path) -> None:
    expect_refusal(inputs, tmp / ("m" * 300), OutputWriteError, "name is too long.*shorter name")


def test_a_file_in_the_way_of_the_output_folder(inputs: Inputs, tmp: Path) -> None:
    (tmp / "afile").write_text("x")
    expect_refusal(inputs, tmp / "afile" / "merged", OutputWriteError, "is a file, not a folder")


@pytest.mark.parametrize(
    ("errno_name", "match"), [("ENOSPC", "disk is full"), ("EDQUOT", "quota"), ("EIO", "check the path")]
)
def test_disk_failure_mid_write(inputs: Inputs, tmp: Path, monkeypatch, errno_name: str, match: str) -> None:
    import errno

    calls = {"n": 0}
    original = merge_core.safetensors_io.StreamingWriter.write

    def failing(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
        return original(self, tensor, *args, **kwargs)

    monkeypatch.setattr(merge_core.safetensors_io.StreamingWriter, "write", failing)
    expect_refusal(inputs, tmp / "merged", OutputWriteError, match, options=MergeOptions(max_shard_size=10_000))
    assert leftovers(tmp) == []


# --- 4. merged values the output dtype cannot hold ---------------------------------------------------------


def _scaled_adapter(inputs: Inputs, alpha: float) -> None:
    config_path = inputs.adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = alpha
    config_path.write_text(json.dumps(config))


def test_delta_that_overflows_the_output_dtype(inputs: Inputs, tmp: Path) -> None:
    _scaled_adapter(inputs, 1e300)  # finite adapter, finite scale, merged weights beyond float32
    expect_refusal(
        inputs,
        tmp / "merged",
        NonFiniteOutputError,
        r"merged tensor model\.layers\.0\.self_attn\.q_proj\.weight \(rows 0-\d+\) goes beyond float32's "
        r"largest value 3\.403e\+38.*lora_alpha",
    )
    assert leftovers(tmp) == []


def test_float16_output_of_a_wide_base_suggests_bfloat16(inputs: Inputs, tmp: Path) -> None:
    weights = load_file(inputs.base / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e6  # fine in float32, not in float16
    save_file(weights, inputs.base / "model.safetensors", metadata={"format": "pt"})
    expect_refusal(
        inputs,
        tmp / "merged",
        NonFiniteOutputError,
        r"model\.layers\.1\.mlp\.up_proj\.weight \(rows 0-\d+\) goes beyond float16's largest value 6\.55e\+04"
        r".*choose bfloat16",
        options=MergeOptions(dtype="float16"),
    )
    merge_adapter(inputs.base, inputs.adapter, tmp / "merged", MergeOptions(dtype="bfloat16"))
    assert torch.isfinite(load_file(tmp / "merged" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]).all()


def test_nan_in_a_base_tensor_the_adapter_changes(inputs: Inputs, tmp: Path) -> None:
    weights = load_file(inputs.base / "model.safetensors")
    weights["model.layers.0.self_attn.v_proj.weight"][3, 1] = float("nan")
    save_file(weights, inputs.base / "model.safetensors", metadata={"format": "pt"})
    expect_refusal(inputs, tmp / "merged", NonFiniteOutputError, r"v_proj\.weight \(rows 0-\d+\) contains NaN")


def test_an_exit_zero_merge_is_finite(inputs: Inputs, tmp: Path) -> None:
    merge_adapter(inputs.base, inputs.adapter, tmp / "merged", MergeOptions(dtype="float16"))
    for name, tensor in load_file(tmp / "merged" / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name


# --- 5. options that cannot work --------------------------------------------------------------------------

BAD_OPTIONS: dict[str, tuple[dict, str]] = {
    "shard size 1e400GB": ({"max_shard_size": "1e400GB"}, "shard size '1e400GB' is out of range"),
    "negative shard size": ({"max_shard_size": "-5GB"}, "out of range"),
    "shard size of words": ({"max_shard_size": "big"}, "Cannot read the size 'big'"),
    "shard size nan": ({"max_shard_size": "nanGB"}, "out of range"),
    "device meta": ({"device": "meta"}, "cannot run on device 'meta'"),
    "device nonsense": ({"device": "gpu0"}, "Unknown device 'gpu0'"),
    "dtype int8": ({"dtype": "int8"}, "Unknown output dtype 'int8'"),
    "compute dtype float16": ({"compute_dtype": "float16"}, "Unknown compute dtype 'float16'"),
}
if not torch.cuda.is_available():
    BAD_OPTIONS["device cuda without a GPU"] = ({"device": "cuda"}, "no usable CUDA GPU; use --device cpu")


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_one_sentence(case: str) -> None:
    kwargs, match = BAD_OPTIONS[case]
    with pytest.raises(InvalidOptionError, match=match) as info:
        MergeOptions(**kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# --- 6. what killed runs leave behind ----------------------------------------------------------------------


def test_stale_staging_of_a_dead_run_is_removed_and_a_live_one_kept(inputs: Inputs, tmp: Path) -> None:
    dead = tmp / ".merged.partial-deadbeef"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half a model")
    (tmp / ".merged.partial-deadbeef.lock").write_text("12345\n")  # its owner is gone: nobody holds it
    legacy = tmp / ".merged.old-0badc0de"  # a trash folder from before lock files existed
    legacy.mkdir()
    live = claim(tmp / ".merged.partial-11ve0000")
    try:
        merge_adapter(inputs.base, inputs.adapter, tmp / "merged")
        assert not dead.exists() and not legacy.exists() and live.folder.is_dir()
        assert leftovers(tmp) == [".merged.partial-11ve0000", ".merged.partial-11ve0000.lock"]
    finally:
        live.release(remove_folder=True)
    assert leftovers(tmp) == []


_KILLED_MERGE = textwrap.dedent("""
    import sys, time
    from merge_core import MergeOptions, merge_adapter
    from merge_core.progress import ProgressUpdate

    def slow(update: ProgressUpdate) -> None:
        if update.done:
            print("writing", flush=True)
            time.sleep(0.2)

    merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], progress=slow)
""")


def test_sigkill_mid_merge_then_the_next_run_cleans_up(inputs: Inputs, tmp: Path) -> None:
    output = tmp / "merged"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_MERGE, str(inputs.base), str(inputs.adapter), str(output)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"  # the staging folder now exists and is half written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [n for n in leftovers(tmp) if ".partial-" in n and not n.endswith(".lock")], "nothing to clean up"
    assert not output.exists()
    before = inputs.hashes()
    merge_adapter(inputs.base, inputs.adapter, output)
    assert leftovers(tmp) == []
    assert (output / "model.safetensors").is_file()
    assert inputs.hashes() == before


def test_sweep_never_touches_unrelated_siblings(tmp: Path) -> None:
    (tmp / "merged-notes.partial").mkdir()
    (tmp / ".other.partial-00000000").mkdir()
    assert sweep_leftovers(tmp / "merged") == []
    assert (tmp / "merged-notes.partial").is_dir() and (tmp / ".other.partial-00000000").is_dir()


def test_lock_is_released_by_death_not_by_time(tmp: Path) -> None:
    """A live owner, however slow, keeps its folder; only its death makes it removable."""
    code = (
        "import sys, time; from merge_core.locks import claim; claim(__import__('pathlib').Path(sys.argv[1]))"
        "; print('held', flush=True); time.sleep(600)"
    )
    folder = tmp / ".merged.partial-5l0w0000"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        time.sleep(0.1)
        assert sweep_leftovers(tmp / "merged") == [] and folder.is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert sweep_leftovers(tmp / "merged") == [folder] and not folder.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_bitwise_finiteness_check_agrees_with_torch(dtype: torch.dtype) -> None:
    from merge_core.tensor_math import Workspace, all_finite

    info = torch.finfo(dtype)
    specials = [
        0.0,
        -0.0,
        info.max,
        -info.max,
        info.tiny,
        info.smallest_normal / 4,
        float("inf"),
        float("-inf"),
        float("nan"),
    ]
    workspace = Workspace()
    for special in specials:
        values = torch.randn(257, dtype=torch.float64).to(dtype)
        values[100] = special
        assert all_finite(values, workspace) == bool(torch.isfinite(values).all()), special


# --- 7. adapters whose config says something else than their file -------------------------------------------


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


_DROP = object()


def _merged_equals_peft(inputs: Inputs, output: Path) -> float:
    from tests.factories import load_model, logits, peft_reference, prompt_ids

    ids = prompt_ids()
    return float(
        (logits(peft_reference(inputs.base, inputs.adapter), ids) - logits(load_model(output), ids)).abs().max()
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": ["q_proj"]},  # the file also holds v_proj weights: PEFT ignores them
        {"target_modules": _DROP},  # PEFT's default targets for llama: q_proj and v_proj
        {"target_modules": r".*layers\.1\..*(q_proj|v_proj)"},  # a regex: only layer 1
        {"layers_to_transform": [0], "layers_pattern": "layers"},
        {"exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    ],
    ids=["list-subset", "missing", "regex", "layers_to_transform", "exclude_modules"],
)
def test_merge_follows_peft_targeting(inputs: Inputs, tmp: Path, changes: dict) -> None:
    _edit_config(inputs.adapter, **changes)
    merge_adapter(inputs.base, inputs.adapter, tmp / "merged")
    assert _merged_equals_peft(inputs, tmp / "merged") <= 1e-4


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"target_modules": r".*no_such_module"}, "AdapterTargetError", "match no module of the base model"),
        ({"r": "8"}, "AdapterConfigError", "r"),
        ({"lora_alpha": "sixteen"}, "AdapterConfigError", "lora_alpha"),
        ({"use_rslora": "yes"}, "AdapterConfigError", "use_rslora"),
    ],
    ids=["regex-matches-nothing", "r-string", "alpha-string", "bool-string"],
)
def test_config_peft_refuses_is_refused(inputs: Inputs, tmp: Path, changes: dict, error: str, match: str) -> None:
    import merge_core.errors

    _edit_config(inputs.adapter, **changes)
    expect_refusal(inputs, tmp / "merged", getattr(merge_core.errors, error), match)
