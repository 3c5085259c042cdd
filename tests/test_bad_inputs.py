"""Each bad input is refused with its own exception, a message that says what to do, and no output."""

from __future__ import annotations

import json
import os
import pickle
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_core
from merge_core import MergeOptions, merge_adapter
from merge_core.errors import (
    AdapterBaseMismatchError,
    AdapterConfigError,
    AdapterWeightsError,
    BaseCheckpointError,
    InsufficientDiskError,
    NonFiniteAdapterWeightsError,
    OutputExistsError,
    ShapeMismatchError,
    TargetModuleNotFoundError,
    UnsupportedAdapterError,
)
from tests.factories import make_adapter, make_base


def assert_no_output(tmp: Path) -> None:
    assert not (tmp / "merged").exists()
    assert not [p for p in tmp.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("llama") / "base", "llama")


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory, llama: Path) -> Path:
    return make_adapter(llama, tmp_path_factory.mktemp("adapter") / "adapter", target_modules=["q_proj", "v_proj"])


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_target_module_missing_in_base(tmp: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2))
    deeper.save_pretrained(tmp / "deep")
    adapter = make_adapter(tmp / "deep", tmp / "adapter", target_modules=["q_proj"])
    shallow = make_base(tmp / "shallow", "llama")
    with pytest.raises(TargetModuleNotFoundError) as err:
        merge_adapter(shallow, adapter, tmp / "merged", MergeOptions(base_name="acme/shallow"))
    message = str(err.value)
    assert "model.layers.2.self_attn.q_proj" in message
    assert "acme/shallow" in message and str(tmp / "deep") in message  # both names
    assert_no_output(tmp)


def test_shape_mismatch_names_both_models(tmp: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    wide.save_pretrained(tmp / "wide")
    adapter = make_adapter(tmp / "wide", tmp / "adapter", target_modules=["q_proj"])
    narrow = make_base(tmp / "narrow", "llama")
    with pytest.raises(AdapterBaseMismatchError) as err:
        merge_adapter(narrow, adapter, tmp / "merged", MergeOptions(base_name="acme/narrow-32"))
    message = str(err.value)
    assert "acme/narrow-32" in message and str(tmp / "wide") in message
    assert "64" in message and "[32, 32]" in message
    assert_no_output(tmp)


def test_shape_mismatch_same_name(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    adapter = copy_adapter(llama_adapter, tmp / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    state[key] = torch.randn(40, state[key].shape[1])
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(ShapeMismatchError) as err:
        merge_adapter(llama, adapter, tmp / "merged")
    assert "model.layers.0.self_attn.q_proj" in str(err.value) and "[32, 32]" in str(err.value)
    assert_no_output(tmp)


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "PREFIX_TUNING"])
def test_unsupported_peft_type(tmp: Path, llama: Path, llama_adapter: Path, peft_type: str) -> None:
    adapter = copy_adapter(llama_adapter, tmp / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = peft_type
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedAdapterError) as err:
        merge_adapter(llama, adapter, tmp / "merged")
    assert peft_type in str(err.value) and "LoRA" in str(err.value) and "DoRA" in str(err.value)
    assert_no_output(tmp)


def test_unsupported_lora_option(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    adapter = copy_adapter(llama_adapter, tmp / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [1, 2]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedAdapterError, match="trainable tokens"):
        merge_adapter(llama, adapter, tmp / "merged")
    assert_no_output(tmp)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_executed(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    adapter = copy_adapter(llama_adapter, tmp / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp / "pwned"
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Exploit(str(marker))}, f)
    with pytest.raises(AdapterWeightsError) as err:
        merge_adapter(llama, adapter, tmp / "merged")
    assert "weights_only" in str(err.value) and "safetensors" in str(err.value)
    assert not marker.exists()
    assert_no_output(tmp)


def test_nan_in_adapter(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    adapter = copy_adapter(llama_adapter, tmp / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    state[key][0, 3] = float("nan")
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(NonFiniteAdapterWeightsError) as err:
        merge_adapter(llama, adapter, tmp / "merged")
    assert key in str(err.value) and "NaN" in str(err.value)
    assert_no_output(tmp)


def test_base_with_only_pickle_weights(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    base = tmp / "pickled"
    base.mkdir()
    (base / "config.json").write_bytes((llama / "config.json").read_bytes())
    torch.save(load_file(llama / "model.safetensors"), base / "pytorch_model.bin")
    with pytest.raises(BaseCheckpointError) as err:
        merge_adapter(base, llama_adapter, tmp / "merged")
    assert "pickle" in str(err.value) and "safetensors" in str(err.value)
    assert_no_output(tmp)


def test_rank_in_config_disagrees_with_weights(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    adapter = copy_adapter(llama_adapter, tmp / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"v_proj": 16}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterConfigError, match="rank 16"):
        merge_adapter(llama, adapter, tmp / "merged")
    assert_no_output(tmp)


def test_adapter_folder_is_a_full_model(tmp: Path, llama: Path) -> None:
    with pytest.raises(AdapterConfigError, match="swap base and adapter"):
        merge_adapter(llama, llama, tmp / "merged")
    assert_no_output(tmp)


def test_output_exists(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    (tmp / "merged").mkdir()
    (tmp / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        merge_adapter(llama, llama_adapter, tmp / "merged")
    assert (tmp / "merged" / "keep.txt").read_text() == "mine"


def test_not_enough_disk(tmp: Path, llama: Path, llama_adapter: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(merge_core.merge.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDiskError) as err:
        merge_adapter(llama, llama_adapter, tmp / "merged")
    assert "GB" in str(err.value) and "free" in str(err.value)
    assert_no_output(tmp)


def test_failure_mid_write_leaves_nothing(tmp: Path, llama: Path, llama_adapter: Path, monkeypatch) -> None:
    calls = {"n": 0}
    original = merge_core.merge.StreamingWriter.write

    def flaky(self, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        return original(self, tensor)

    monkeypatch.setattr(merge_core.merge.StreamingWriter, "write", flaky)
    with pytest.raises(OSError, match="disk went away"):
        merge_adapter(llama, llama_adapter, tmp / "merged", MergeOptions(max_shard_size=10_000))
    assert_no_output(tmp)


def test_overwrite_replaces_atomically(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    (tmp / "merged").mkdir()
    (tmp / "merged" / "stale.txt").write_text("old")
    merge_adapter(llama, llama_adapter, tmp / "merged", overwrite=True)
    assert not (tmp / "merged" / "stale.txt").exists()
    assert (tmp / "merged" / "model.safetensors").is_file()
    assert not [p for p in tmp.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_name_mismatch_with_matching_shapes_is_a_warning(tmp: Path, llama: Path, llama_adapter: Path) -> None:
    report = merge_adapter(llama, llama_adapter, tmp / "merged", MergeOptions(base_name="someone/else"))
    assert any("someone/else" in w for w in report.warnings)


def test_writer_failure_with_many_blocks_in_flight_raises_instead_of_hanging(tmp: Path, llama: Path, llama_adapter: Path,
                                                                              monkeypatch) -> None:
    import threading

    from merge_core import build_plan, execute_plan

    def broken(self, tensor):
        raise OSError("disk went away")

    monkeypatch.setattr(merge_core.merge.StreamingWriter, "write", broken)
    plan = build_plan(llama, llama_adapter)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            execute_plan(plan, tmp / "merged", block_elements=64)  # hundreds of tiny blocks
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the merge hung after the writer thread failed"
    assert isinstance(outcome.get("error"), OSError)
    assert_no_output(tmp)
