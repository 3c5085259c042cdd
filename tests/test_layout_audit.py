"""Checkpoint and adapter layouts people publish: each merges as transformers + PEFT load it, or is refused.

Every merge is compared with PeftModel.from_pretrained(base, adapter) in float32; every refusal is one that
PEFT (or transformers) makes too, checked here on the same files, and leaves no output behind.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core import merge_adapter
from merge_core.errors import AdapterConfigError, AdapterWeightsError
from merge_core.pipeline import MergeRequest, run_merge
from tests.conftest import HUB_PORT
from tests.factories import load_model, logits, make_adapter, make_base, peft_reference, prompt_ids
from tests.hubserver import HubServer

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layout-pair")
    base = make_base(root / "base", "llama")
    return base, make_adapter(base, root / "adapter", target_modules=TARGETS)


def assert_matches_peft(base: Path, adapter: Path, merged: Path) -> None:
    ids = prompt_ids()
    reference = logits(peft_reference(base, adapter), ids)
    assert (logits(load_model(merged), ids) - reference).abs().max().item() < 1e-4


def with_stale_index(base: Path, folder: Path) -> Path:
    """The base as one model.safetensors beside the index of an older, sharded upload whose shards are gone."""
    shutil.copytree(base, folder)
    names = list(load_file(folder / "model.safetensors"))
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def edit_keys(adapter: Path, folder: Path, rename) -> Path:
    shutil.copytree(adapter, folder)
    state = load_file(folder / "adapter_model.safetensors")
    save_file({rename(k): v for k, v in state.items()}, folder / "adapter_model.safetensors")
    return folder


def test_single_file_base_beside_a_stale_index_merges_the_file_transformers_loads(tmp: Path, pair) -> None:
    # Was: "The index lists 2 shard(s) but 2 are missing", although from_pretrained loads model.safetensors.
    base = with_stale_index(pair[0], tmp / "base")
    merge_adapter(base, pair[1], tmp / "merged")
    assert_matches_peft(base, pair[1], tmp / "merged")


def test_hub_base_with_a_single_file_and_a_stale_index_merges(tmp: Path, pair) -> None:
    # The Hub path reads the headers of model.safetensors (huggingface_hub's choice) and must load the same file.
    base = with_stale_index(pair[0], tmp / "base")
    hub = HubServer(tmp / "hub", port=HUB_PORT).start()
    try:
        hub.create_repo("acme/resaved-llama")
        hub.upload_dir("acme/resaved-llama", base)
        request = MergeRequest(adapter=str(pair[1]), base="acme/resaved-llama", endpoint=hub.url)
        result = run_merge(request, tmp / "work")
    finally:
        hub.stop()
    assert_matches_peft(base, pair[1], result.output_dir)


def test_legacy_format_pickle_adapter_loads_as_peft_loads_it(tmp: Path, pair) -> None:
    # Was: refused, since torch maps only its zip format; PEFT's torch.load(weights_only=True) reads it.
    adapter = shutil.copytree(pair[1], tmp / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(state, adapter / "adapter_model.bin", _use_new_zipfile_serialization=False)
    merge_adapter(pair[0], adapter, tmp / "merged")
    assert_matches_peft(pair[0], adapter, tmp / "merged")


def test_safetensors_wins_over_a_pickle_beside_it_as_in_peft(tmp: Path, pair) -> None:
    adapter = shutil.copytree(pair[1], tmp / "adapter")
    zeros = {k: torch.zeros_like(v) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    torch.save(zeros, adapter / "adapter_model.bin")
    merge_adapter(pair[0], adapter, tmp / "merged")
    assert_matches_peft(pair[0], adapter, tmp / "merged")
    assert (
        logits(load_model(tmp / "merged"), prompt_ids()) - logits(load_model(pair[0]), prompt_ids())
    ).abs().max() > 0.1


def _peft_missing_keys(base: Path, adapter: Path) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_reference(base, adapter)
    return any("missing adapter keys" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("rename", "words"),
    [
        (lambda k: k.removeprefix("base_model.model."), "without PEFT's base_model.model. prefix"),
        (lambda k: "base_model.model." + k, "with PEFT's base_model.model. prefix twice"),
    ],
    ids=["no-prefix", "wrapped-twice"],
)
def test_keys_peft_would_not_load_are_refused(tmp: Path, pair, rename, words: str) -> None:
    # Was: merged through the suffix match, a model PeftModel.from_pretrained never gives (it skips these keys).
    adapter = edit_keys(pair[1], tmp / "adapter", rename)
    assert _peft_missing_keys(pair[0], adapter)
    with pytest.raises(AdapterWeightsError) as refusal:
        merge_adapter(pair[0], adapter, tmp / "merged")
    message = refusal.value.args[0]
    assert words in message and "rename the keys to start with a single base_model.model." in message
    assert not (tmp / "merged").exists()


def test_adapter_name_infix_of_older_peft_merges(tmp: Path, pair) -> None:
    adapter = edit_keys(pair[1], tmp / "adapter", lambda k: k.replace(".weight", ".default.weight"))
    merge_adapter(pair[0], adapter, tmp / "merged")
    assert_matches_peft(pair[0], adapter, tmp / "merged")


@pytest.mark.parametrize(
    ("key", "value", "peft_error", "words"),
    [
        ("task_type", "causal_lm", ValueError, 'task_type is "causal_lm" but must be one of PEFT\'s task types'),
        ("peft_type", "lora", KeyError, 'peft_type is "lora" but must be in capitals'),
    ],
)
def test_lower_case_names_are_refused_as_peft_refuses_them(
    tmp: Path, pair, key: str, value: str, peft_error: type, words: str
) -> None:
    # Was: merged, while PEFT refuses both (PeftConfig's task check; its peft_type -> config class lookup).
    adapter = shutil.copytree(pair[1], tmp / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(peft_error):
        peft_reference(pair[0], adapter)
    with pytest.raises(AdapterConfigError, match=words):
        merge_adapter(pair[0], adapter, tmp / "merged")
    assert not (tmp / "merged").exists()


def test_old_and_new_peft_config_fields_merge(tmp: Path, pair) -> None:
    # PEFT 0.2's fields (enable_lora, merge_weights), newer ones this tool does not know, nulls, a regex target.
    adapter = shutil.copytree(pair[1], tmp / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.pop("task_type")
    config.update(
        enable_lora=None,
        merge_weights=False,
        some_future_option={"x": 1},
        base_model_name_or_path=None,
        revision="main",
        inference_mode=False,
        modules_to_save=None,
        target_modules=r".*\.(q_proj|v_proj|down_proj)",
    )
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    merge_adapter(pair[0], adapter, tmp / "merged")
    assert_matches_peft(pair[0], adapter, tmp / "merged")


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory: pytest.TempPathFactory, pair) -> tuple[Path, Path]:
    """An unsloth-style adapter: LoRA plus full copies of embed_tokens and lm_head (modules_to_save)."""
    root = tmp_path_factory.mktemp("saved-pair")
    adapter = make_adapter(
        pair[0], root / "adapter", target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    return pair[0], adapter


def test_embedding_and_head_in_modules_to_save_merge(tmp: Path, saved_pair) -> None:
    merge_adapter(*saved_pair, tmp / "merged")
    assert_matches_peft(*saved_pair, tmp / "merged")


def _peft_refuses(base: Path, adapter: Path, missing: str) -> None:
    with pytest.raises(KeyError, match=missing):
        peft_reference(base, adapter)


def test_a_modules_to_save_module_without_its_copy_is_refused_as_peft_refuses_it(tmp: Path, saved_pair) -> None:
    # Was: merged with the base's lm_head, while PEFT raises KeyError for the copy it must load.
    adapter = shutil.copytree(saved_pair[1], tmp / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if "lm_head" not in k}, adapter / "adapter_model.safetensors")
    _peft_refuses(saved_pair[0], adapter, "base_model.model.lm_head.weight")
    with pytest.raises(
        AdapterWeightsError, match=r"full copy of lm_head, but adapter_model.safetensors holds no lm_head"
    ):
        merge_adapter(saved_pair[0], adapter, tmp / "merged")
    assert not (tmp / "merged").exists()


@pytest.mark.parametrize("infix", ["modules_to_save.default.", "modules_to_save."])
def test_a_copy_under_the_wrappers_in_memory_name_is_refused_as_peft_cannot_load_it(
    tmp: Path, saved_pair, infix: str
) -> None:
    # Was: merged as the copy, while PEFT looks the copy up under the plain name only (KeyError).
    def rename(key: str) -> str:
        return key.replace("lm_head.weight", f"lm_head.{infix}weight")

    adapter = edit_keys(saved_pair[1], tmp / "adapter", rename)
    _peft_refuses(saved_pair[0], adapter, "base_model.model.lm_head.weight")
    with pytest.raises(AdapterWeightsError, match=r"rename the key to base_model\.model\.lm_head\.weight"):
        merge_adapter(saved_pair[0], adapter, tmp / "merged")
    assert not (tmp / "merged").exists()


def test_the_plain_copy_wins_over_the_wrappers_copy_as_in_peft(tmp: Path, saved_pair) -> None:
    # save_embedding_layers writes both names; PEFT loads the plain one (was: the wrapper's one won).
    adapter = shutil.copytree(saved_pair[1], tmp / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    head = "base_model.model.lm_head.weight"
    state[head.replace(".weight", ".modules_to_save.weight")] = state[head] + 0.5
    save_file(state, adapter / "adapter_model.safetensors")
    merge_adapter(saved_pair[0], adapter, tmp / "merged")
    assert_matches_peft(saved_pair[0], adapter, tmp / "merged")


def test_an_empty_pickle_adapter_is_refused_with_what_to_do(tmp: Path, pair) -> None:
    # alpaca-lora's known empty save: PEFT loads it as no change at all (missing keys), so nothing merges.
    adapter = shutil.copytree(pair[1], tmp / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({}, adapter / "adapter_model.bin")
    assert _peft_missing_keys(pair[0], adapter)
    with pytest.raises(AdapterWeightsError, match="holds no tensors; use a checkpoint of the adapter whose file has"):
        merge_adapter(pair[0], adapter, tmp / "merged")
    assert not (tmp / "merged").exists()


def test_the_declared_base_is_fetched_at_the_revision_the_adapter_records(tmp: Path, pair) -> None:
    # Was: the base repo's newest commit, not the one the adapter names (AutoPeftModel loads config.revision).
    newer = make_base(tmp / "newer", "llama", seed=7)
    hub = HubServer(tmp / "hub", port=HUB_PORT).start()
    try:
        hub.create_repo("acme/evolving-llama")
        trained_on = hub.upload_dir("acme/evolving-llama", pair[0])
        hub.upload_dir("acme/evolving-llama", newer)
        adapter = shutil.copytree(pair[1], tmp / "adapter")
        config = json.loads((adapter / "adapter_config.json").read_text())
        config.update(base_model_name_or_path="acme/evolving-llama", revision=trained_on)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        result = run_merge(MergeRequest(adapter=str(adapter), base="", endpoint=hub.url), tmp / "work")
    finally:
        hub.stop()
    assert result.inputs.base.revision == trained_on
    assert_matches_peft(pair[0], adapter, result.output_dir)


def test_a_hub_adapter_with_both_formats_downloads_only_the_safetensors_peft_reads(tmp: Path, pair) -> None:
    adapter = shutil.copytree(pair[1], tmp / "adapter")
    zeros = {k: torch.zeros_like(v) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    torch.save(zeros, adapter / "adapter_model.bin")
    hub = HubServer(tmp / "hub", port=HUB_PORT).start()
    try:
        hub.create_repo("alice/both-formats")
        hub.upload_dir("alice/both-formats", adapter)
        result = run_merge(MergeRequest(adapter="alice/both-formats", base=str(pair[0]), endpoint=hub.url), tmp / "w")
    finally:
        hub.stop()
    assert not (result.inputs.adapter_dir / "adapter_model.bin").exists()
    assert_matches_peft(pair[0], adapter, result.output_dir)


def test_modules_to_save_as_one_string_is_refused_as_peft_cannot_load_it(tmp: Path, pair) -> None:
    # Was: merged as ["lm_head"], while PEFT matches the string letter by letter, wraps "model" and raises KeyError.
    adapter = make_adapter(pair[0], tmp / "adapter", target_modules=["q_proj"], modules_to_save=["lm_head"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": "lm_head"}))
    with pytest.raises(KeyError):
        peft_reference(pair[0], adapter)
    with pytest.raises(
        AdapterConfigError, match=r'modules_to_save is "lm_head" but must be a list such as \["lm_head"\]'
    ):
        merge_adapter(pair[0], adapter, tmp / "merged")
    assert not (tmp / "merged").exists()
