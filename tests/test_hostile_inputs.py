"""Hostile and broken inputs: each is refused with its own exception and one sentence that says what to do,
identically by merge_adapter, the CLI and the app's message, with every input untouched and nothing left
behind; or, where PEFT and transformers read the input, merged to exactly what they compute.

The refusals run through merge_adapter and then through ``cli.main`` (in process: an exception escaping it
fails the test, which is what a traceback is); the acceptances compare logits with PeftModel.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core import cli, merge_adapter
from merge_core.combine import AdapterSource, combine_adapters
from merge_core.errors import (
    AdapterConfigError,
    AdapterWeightsError,
    BaseCheckpointError,
    MergeError,
    OutputWriteError,
    ShapeMismatchError,
)
from merge_core.jobs import failure_message
from tests.factories import load_model, logits, make_adapter, make_base, peft_reference, prompt_ids

ADAPTER_FILE = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SAVE_AGAIN = "save the adapter again with PEFT"
CORRUPT_ADAPTER = r"adapter weights /.*/adapter_model\.safetensors are corrupt \(.*{}.*\); download the adapter again"
CORRUPT_BASE = r"Base shard model\.safetensors is corrupt \(.*{}.*\); download it again"


def tree_state(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    base = make_base(root / "base")
    return {
        "base": base,
        "adapter": make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"]),
        "sharded": make_base(root / "sharded", max_shard_size="20KB"),
    }


@dataclass(frozen=True)
class Case:
    """A copy of the tiny base (``base``) and adapter (``adapter``) in ``root``, to be broken by the case."""

    root: Path
    sharded_source: Path  # the module's sharded base (read-only), for cases that need an index

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def config(self, **changes: Any) -> None:
        path = self.adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def sharded(self) -> None:
        shutil.rmtree(self.base)
        shutil.copytree(self.sharded_source, self.base)

    def index(self, change: Callable[[dict[str, str]], None]) -> None:
        path = self.base / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        change(index["weight_map"])
        path.write_text(json.dumps(index))


@pytest.fixture
def case(tmp_path: Path, pristine: dict[str, Path]) -> Case:
    shutil.copytree(pristine["base"], tmp_path / "models" / "base")
    shutil.copytree(pristine["adapter"], tmp_path / "models" / "adapter")
    return Case(tmp_path / "models", pristine["sharded"])


# --- safetensors files rewritten byte by byte ----------------------------------------------------------------


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: Any, data: bytes, *, raw_header: bytes | None = None) -> None:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _first_two(header: dict[str, Any]) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    return names[0], names[1]


def _header_edit(edit: Callable[[dict[str, Any], str, str], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        header, data = _split(path)
        first, second = _first_two(header)
        edit(header, first, second)
        _write(path, header, data)

    return apply


def _set(field: str, value: Any) -> Callable[[dict[str, Any], str, str], None]:
    return lambda h, first, second: h[first].__setitem__(field, value)


def _overlap(h: dict[str, Any], first: str, second: str) -> None:
    h[second]["data_offsets"], h[second]["shape"] = h[first]["data_offsets"], h[first]["shape"]


def _point_into_header(h: dict[str, Any], first: str, second: str) -> None:
    begin, end = h[first]["data_offsets"]
    h[first]["data_offsets"] = [begin - (end - begin), begin]  # negative: the bytes before the data


def _append(extra: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(path.read_bytes() + extra)


def _raw_header(text: bytes) -> Callable[[Path], None]:
    return lambda path: _write(path, None, _split(path)[1], raw_header=text)


def _header_length(n: int) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(struct.pack("<Q", n) + path.read_bytes()[8:])


SAFETENSORS_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty-file": (lambda path: path.write_bytes(b""), "too short"),
    "header-is-a-list": (_raw_header(b"[1, 2]"), "not a JSON object"),
    "header-nests-too-deep": (_raw_header(b"[" * 100_000 + b"]" * 100_000), "nests lists or objects too deeply"),
    "header-length-past-the-end": (_header_length(1_000_000), "implausible header size"),
    "entry-not-an-object": (_header_edit(lambda h, first, second: h.__setitem__(first, 5)), "is not an object"),
    "dtype-missing": (_header_edit(lambda h, first, second: h[first].pop("dtype")), "unsupported dtype None"),
    "shape-a-string": (_header_edit(_set("shape", "abc")), "invalid shape"),
    "shape-negative": (_header_edit(_set("shape", [-4, -32])), "invalid shape"),
    "offsets-floats": (_header_edit(_set("data_offsets", [0.0, 512.0])), "invalid data_offsets"),
    "offsets-one-number": (_header_edit(_set("data_offsets", [0])), "invalid data_offsets"),
    "offsets-into-the-header": (_header_edit(_point_into_header), "invalid data_offsets"),
    "offsets-overlap": (_header_edit(_overlap), "overlap or gap"),
    "bytes-after-the-data": (_append(b"\0" * 64), "bytes no tensor describes"),
    "metadata-not-strings": (
        _header_edit(lambda h, first, second: h.__setitem__("__metadata__", {"format": "pt", "n": 5})),
        "__metadata__ must map names to strings",
    ),
}


@dataclass(frozen=True)
class Refusal:
    id: str
    build: Callable[[Case], Any]  # breaks the case's copies; may return {"base": ..., "adapter": ...}
    error: type[MergeError]
    match: str


def _damaged(file: Callable[[Case], Path], damage: Callable[[Path], None]) -> Callable[[Case], None]:
    return lambda c: damage(file(c))


def _adapter_file(c: Case) -> Path:
    return c.adapter / ADAPTER_FILE


def _base_file(c: Case) -> Path:
    return c.base / "model.safetensors"


def _config_text(text: bytes) -> Callable[[Case], None]:
    return lambda c: (c.adapter / "adapter_config.json").write_bytes(text)


def _config(**changes: Any) -> Callable[[Case], None]:
    return lambda c: c.config(**changes)


def _weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Case], None]:
    def build(c: Case) -> None:
        state = load_file(c.adapter / ADAPTER_FILE)
        change(state)
        save_file(state, c.adapter / ADAPTER_FILE)

    return build


def _indexed(change: Callable[[dict[str, str]], None]) -> Callable[[Case], None]:
    def build(c: Case) -> None:
        c.sharded()
        c.index(change)

    return build


def _first_shard_to(name: Any) -> Callable[[dict[str, str]], None]:
    def change(weight_map: dict[str, str]) -> None:
        first = sorted(set(weight_map.values()))[0]
        for tensor, shard in weight_map.items():
            if shard == first:
                weight_map[tensor] = name

    return change


def _misplace_head(weight_map: dict[str, str]) -> None:
    weight_map["lm_head.weight"] = sorted(set(weight_map.values()) - {weight_map["lm_head.weight"]})[0]


def _saved_norm_copy(
    value: torch.Tensor, key: str = "base_model.model.model.norm.modules_to_save.default.weight", **config: Any
) -> Callable[[Case], None]:
    """A modules_to_save copy of the final norm in the adapter file (and ``config`` changes)."""

    def build(c: Case) -> None:
        _weights(lambda s: s.__setitem__(key, value))(c)
        c.config(**config)

    return build


REFUSALS = [
    # adapter_config.json as text
    *[
        Refusal(f"config-{name}", _config_text(text), AdapterConfigError, f"cannot be read: .*{why}.*{SAVE_AGAIN}")
        for name, text, why in [
            ("not-json", b"{not json", "it is not valid JSON"),
            ("byte-order-mark", b'\xef\xbb\xbf{"peft_type": "LORA"}', "byte-order mark"),
            ("latin-1", '{"peft_type": "LORA\xe9"}'.encode("latin-1"), "not UTF-8"),
            ("nested-too-deep", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
            ("number-of-5000-digits", b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}", "number too long"),
        ]
    ],
    Refusal("config-a-list", _config_text(b"[1, 2]"), AdapterConfigError, f"not a JSON object.*{SAVE_AGAIN}"),
    Refusal("config-without-peft_type", _config(peft_type=None), AdapterConfigError, "no peft_type.*save_pretrained"),
    # strings PEFT compiles into regular expressions
    *[
        Refusal(f"regex-{key}", _config(**changes), AdapterConfigError, f"{key} holds .*not a valid regular expression")
        for key, changes in [
            ("target_modules", {"target_modules": "(["}),
            ("exclude_modules", {"exclude_modules": "(["}),
            ("rank_pattern", {"rank_pattern": {"(": 4}}),
            ("alpha_pattern", {"alpha_pattern": {"[": 8}}),
            ("layers_pattern", {"layers_to_transform": [0], "layers_pattern": "(["}),
            ("modules_to_save", {"modules_to_save": ["lm_head["]}),
        ]
    ],
    Refusal("task-type-unknown-to-peft", _config(task_type="NOT_A_TASK"), AdapterConfigError, "task types in capitals"),
    # a config that promises tensors the file does not have, or a targeting PEFT refuses
    Refusal("lora_bias-without-biases", _config(lora_bias=True), AdapterWeightsError, f"lora_bias.*{SAVE_AGAIN}"),
    Refusal(
        "trainable_token_indices-without-rows",
        _config(trainable_token_indices=[1, 2]),
        AdapterWeightsError,
        "trainable_tokens_delta",
    ),
    Refusal("dora-without-magnitudes", _config(use_dora=True), AdapterWeightsError, f"DoRA.*{SAVE_AGAIN}"),
    # adapter and base safetensors files
    *[
        Refusal(
            f"adapter-{name}",
            _damaged(_adapter_file, damage),
            AdapterWeightsError,
            CORRUPT_ADAPTER.format(re.escape(words)),
        )
        for name, (damage, words) in SAFETENSORS_DAMAGE.items()
    ],
    *[
        Refusal(
            f"base-{name}", _damaged(_base_file, damage), BaseCheckpointError, CORRUPT_BASE.format(re.escape(words))
        )
        for name, (damage, words) in SAFETENSORS_DAMAGE.items()
        if name in ("offsets-overlap", "offsets-into-the-header", "shape-negative", "offsets-floats")
    ],
    Refusal(
        "lora_A-flattened",
        _weights(lambda s: s.__setitem__(Q_A, s[Q_A].flatten())),
        AdapterWeightsError,
        r"lora_A has shape \[128\] and lora_B \[32, 4\], neither LoRA matrices nor the factors PEFT gives a "
        r"convolution.*save it again with PEFT",
    ),
    Refusal(
        "saved-copy-of-another-shape",
        _saved_norm_copy(torch.ones(7), "base_model.model.model.norm.weight", modules_to_save=["norm"]),
        ShapeMismatchError,
        r"saved copy of model\.norm\.weight has shape \[7\], the base's is \[32\]",
    ),
    Refusal(
        "adapter-without-tensors",
        lambda c: _write(_adapter_file(c), {"__metadata__": {"format": "pt"}}, b""),
        AdapterWeightsError,
        "holds no tensors; use a checkpoint of the adapter whose file has weights",
    ),
    Refusal(
        "adapter-pickle-not-a-torch-file",
        lambda c: (_adapter_file(c).unlink(), (c.adapter / "adapter_model.bin").write_bytes(b"garbage")),
        AdapterWeightsError,
        r"adapter_model\.bin is not a PyTorch weights file that loads safely with weights_only=True.*safetensors",
    ),
    # the base's config and index
    Refusal(
        "base-config-nested-too-deep",
        lambda c: (c.base / "config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000),
        BaseCheckpointError,
        "too deeply.*download the model again",
    ),
    *[
        Refusal(
            f"base-config-{name}",
            lambda c, text=text: (c.base / "config.json").write_text(text),
            BaseCheckpointError,
            "names no model_type.*complete config.json",
        )
        for name, text in [("empty-object", "{}"), ("model_type-null", '{"model_type": null, "vocab_size": 32}')]
    ],
    *[
        Refusal(
            f"index-shard-{name}",
            _indexed(_first_shard_to(value)),
            BaseCheckpointError,
            "not a file inside the model's folder.*download the model again",
        )
        for name, value in [("outside-the-folder", "../x.safetensors"), ("absolute", "/etc/passwd"), ("int", 5)]
    ],
    Refusal(
        "index-misplaces-a-tensor",
        _indexed(_misplace_head),
        BaseCheckpointError,
        "places lm_head.weight in .*does not match its shards, so download the model again",
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r.id)
def test_refused_in_one_sentence_by_api_cli_and_app(
    refusal: Refusal, case: Case, capsys: pytest.CaptureFixture[str]
) -> None:
    refusal.build(case)
    output = case.root.parent / "merged"
    before = tree_state(case.root.parent)
    with pytest.raises(refusal.error, match=refusal.match) as info:
        merge_adapter(case.base, case.adapter, output)
    message = str(info.value)
    assert "\n" not in message and message.endswith("."), message
    assert failure_message(info.value, None) == message  # what the app shows
    capsys.readouterr()
    assert cli.main([str(case.base), str(case.adapter), str(output), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert tree_state(case.root.parent) == before


def test_nul_in_the_output_path_is_one_sentence(case: Case) -> None:
    with pytest.raises(OutputWriteError, match="NUL character.*choose another name"):
        merge_adapter(case.base, case.adapter, case.root / "a\0b")


# --- accepted: what PEFT and transformers read, merged to what they compute -------------------------------------


def _max_diff(base: Path, adapter: Path, merged: Path) -> float:
    ids = prompt_ids()
    return float((logits(peft_reference(base, adapter), ids) - logits(load_model(merged), ids)).abs().max())


def _legacy_pickle(c: Case) -> None:
    state = load_file(_adapter_file(c))
    _adapter_file(c).unlink()
    torch.save(state, c.adapter / "adapter_model.bin", _use_new_zipfile_serialization=False)


def _single_file_beside_an_index(c: Case) -> None:
    """transformers loads model.safetensors when the folder also has an index (and shards of other weights)."""
    c.sharded()
    shutil.copy(make_base(c.root / "other", seed=7) / "model.safetensors", c.base / "model.safetensors")


ACCEPTED: dict[str, Callable[[Case], None]] = {
    # modules_to_save does not name the norm: PEFT skips the copy as an unexpected key (it used to replace the norm)
    "copy-of-a-module-modules_to_save-leaves-out": _saved_norm_copy(torch.full((32,), 3.0)),
    "legacy-pickle-format": _legacy_pickle,  # torch.save(_use_new_zipfile_serialization=False): no mmap
    "float8-adapter-weights": _weights(lambda s: s.__setitem__(Q_A, s[Q_A].to(torch.float8_e4m3fn))),
    "model.safetensors-beside-an-index": _single_file_beside_an_index,
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_and_equal_to_peft(name: str, case: Case) -> None:
    ACCEPTED[name](case)
    merge_adapter(case.base, case.adapter, case.root / "merged")
    assert _max_diff(case.base, case.adapter, case.root / "merged") <= 1e-4


def test_stack_of_a_lora_bias_adapter_and_a_plain_one_merges_like_peft(tmp_path: Path) -> None:
    """The stacked adapter has lora_bias on: every module needs a lora_B bias, zeros where no source trained one."""
    from peft import PeftModel

    base = make_base(tmp_path / "base", "qwen2")  # q/k/v projections with biases
    plain = make_adapter(base, tmp_path / "plain", target_modules=["q_proj"])
    biased = make_adapter(base, tmp_path / "biased", seed=2, target_modules=["k_proj"], lora_bias=True)
    sources = [AdapterSource(plain, name="plain"), AdapterSource(biased, name="biased")]
    stacked = combine_adapters(sources, "stack", tmp_path / "stacked")
    merge_adapter(base, stacked, tmp_path / "merged")
    model = PeftModel.from_pretrained(load_model(base), plain, adapter_name="plain")
    model.load_adapter(biased, adapter_name="biased")
    model.base_model.set_adapter(["plain", "biased"])
    ids = prompt_ids()
    assert float((logits(model, ids) - logits(load_model(tmp_path / "merged"), ids)).abs().max()) <= 1e-4


def test_output_path_of_undecodable_bytes_merges_and_prints(
    tmp_path: Path, pristine: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name of non-UTF-8 bytes: the card and the summary used to fail after the merge, leaving it behind (exit 2)."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # as under en_US.UTF-8
    monkeypatch.setattr(sys, "stdout", stdout)
    output = tmp_path / "merged\udcff\udcfe"
    assert cli.main([str(pristine["base"]), str(pristine["adapter"]), str(output)]) == 0
    stdout.flush()
    assert os.fsencode(output) in stdout.buffer.getvalue()  # the summary names it as its bytes
    assert (output / "README.md").read_text(encoding="utf-8").count("\ufffd") >= 2
    assert (output / "model.safetensors").is_file()


def test_a_failure_after_publishing_leaves_no_output(
    case: Case, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up while the model card is written, after the shards were published: exit 2, no folder."""
    import errno

    from merge_core.pipeline import MergeResult

    def full(self: MergeResult, repo_id: str | None = None) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.output_dir / "README.md"))

    monkeypatch.setattr(MergeResult, "write_card", full)
    before = tree_state(case.root.parent)
    assert cli.main([str(case.base), str(case.adapter), str(case.root.parent / "merged"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not read or write ") and err.endswith(
        "the disk is full; free some space or choose a folder on another disk.\n"
    )
    assert tree_state(case.root.parent) == before


def test_a_refused_run_leaves_no_parent_folders(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI made the output's missing parents before reading the inputs, and left them behind on a refusal."""
    (case.adapter / "adapter_config.json").write_text("{not json")
    before = tree_state(case.root.parent)
    output = case.root.parent / "new" / "deeper" / "merged"
    assert cli.main([str(case.base), str(case.adapter), str(output), "--quiet"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert tree_state(case.root.parent) == before


def test_a_write_failure_leaves_no_parent_folders(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up mid-write into an output whose parents did not exist: staging and parents both go."""
    import errno

    import merge_core.safetensors_io

    def full(self: Any, tensor: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(merge_core.safetensors_io.StreamingWriter, "write", full)
    before = tree_state(case.root.parent)
    with pytest.raises(OutputWriteError, match="disk is full"):
        merge_adapter(case.base, case.adapter, case.root.parent / "new" / "deeper" / "merged")
    assert tree_state(case.root.parent) == before


@pytest.mark.parametrize(("which", "error"), [("base", BaseCheckpointError), ("adapter", AdapterConfigError)])
def test_nul_in_an_input_path_is_refused_by_its_loader(case: Case, which: str, error: type[MergeError]) -> None:
    """os.path.realpath raised a bare ValueError ('embedded null byte') in the output guard."""
    paths = {"base": case.base, "adapter": case.adapter, which: case.root / "a\0b"}
    with pytest.raises(error, match="does not exist|No adapter_config.json"):
        merge_adapter(paths["base"], paths["adapter"], case.root.parent / "merged")
    assert not (case.root.parent / "merged").exists()


def test_every_dtype_safetensors_reads_is_copied_bit_for_bit(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """U16/U32/U64, the FNUZ float8 kinds and C64 were refused as a "corrupt" shard; transformers reads them."""
    state = load_file(_base_file(case))
    extra = {
        "extra.u16": torch.arange(6).to(torch.uint16),
        "extra.u32": torch.arange(10).to(torch.uint32),
        "extra.u64": torch.arange(3).to(torch.uint64),
        "extra.e4m3fnuz": torch.randn(4).to(torch.float8_e4m3fnuz),
        "extra.e5m2fnuz": torch.randn(4).to(torch.float8_e5m2fnuz),
        "extra.c64": torch.randn(3, dtype=torch.complex64),
    }
    save_file({**state, **extra}, _base_file(case), metadata={"format": "pt"})
    # --verify reads them back too (its finiteness check had no float8 path either)
    assert cli.main([str(case.base), str(case.adapter), str(case.root / "merged"), "--verify", "--quiet"]) == 0
    merged = load_file(case.root / "merged" / "model.safetensors")
    for name, value in extra.items():
        assert merged[name].dtype == value.dtype and torch.equal(
            merged[name].view(torch.uint8), value.view(torch.uint8)
        )
    assert _max_diff(case.base, case.adapter, case.root / "merged") <= 1e-4
