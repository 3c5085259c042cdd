"""Each bad input is refused with its own exception, a message that says what to do, and nothing left behind.

Two tables, one case per bad input: merges (``merge_adapter``) and combinations (``combine_adapters``).
Every case asserts the exception class, the words its message must contain, and that the folders the
call could touch are exactly as they were before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import threading
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_core
from merge_core import MergeOptions, build_plan, execute_plan, merge_adapter
from merge_core.combine import (
    AdapterSource,
    CombinationArgumentError,
    DifferentBaseModelsError,
    IncompatibleAdaptersError,
    UnknownCombinationTypeError,
    UnsupportedCombinationError,
    combine_adapters,
)
from merge_core.errors import (
    AdapterBaseMismatchError,
    AdapterConfigError,
    AdapterWeightsError,
    BaseCheckpointError,
    InsufficientDiskError,
    NonFiniteAdapterWeightsError,
    OutputExistsError,
    OutputWriteError,
    ShapeMismatchError,
    TargetModuleNotFoundError,
    UnsupportedAdapterError,
)
from tests.conftest import with_config
from tests.factories import make_adapter, make_base

Q_PROJ_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V_PROJ_A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"


def tree_state(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` with the sha256 of its content: what "nothing left behind" compares."""
    state = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(adapter: Path, **changes: Any) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def edit_weights(adapter: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    state = load_file(adapter / "adapter_model.safetensors")
    change(state)
    save_file(state, adapter / "adapter_model.safetensors")
    return adapter


# --- merges --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What a merge case starts from: the shared tiny base and adapter (read-only) and its own folder."""

    tmp: Path
    base: Path
    adapter: Path
    monkeypatch: pytest.MonkeyPatch

    def adapter_copy(self) -> Path:
        return copy_adapter(self.adapter, self.tmp / "adapter")


@dataclass(frozen=True)
class Attempt:
    base: Path
    adapter: Path
    options: MergeOptions = field(default_factory=MergeOptions)
    words: tuple[str, ...] = ()  # words known only once the inputs exist (their paths)


@dataclass(frozen=True)
class MergeRefusal:
    id: str
    build: Callable[[Inputs], Attempt]
    error: type[BaseException]
    words: tuple[str, ...]


def _target_missing_in_base(i: Inputs) -> Attempt:
    adapter = make_adapter(make_base(i.tmp / "deep", layers=3), i.tmp / "adapter", target_modules=["q_proj"])
    return Attempt(i.base, adapter, MergeOptions(base_name="acme/shallow"), (str(i.tmp / "deep"),))


def _other_hidden_size(i: Inputs) -> Attempt:
    adapter = make_adapter(make_base(i.tmp / "wide", hidden=64), i.tmp / "adapter", target_modules=["q_proj"])
    return Attempt(i.base, adapter, MergeOptions(base_name="acme/narrow-32"), (str(i.tmp / "wide"),))


def _lora_b_of_another_shape(i: Inputs) -> Attempt:
    def change(state: dict[str, torch.Tensor]) -> None:
        state[Q_PROJ_B] = torch.randn(40, state[Q_PROJ_B].shape[1])

    return Attempt(i.base, edit_weights(i.adapter_copy(), change))


def _peft_type(peft_type: str) -> Callable[[Inputs], Attempt]:
    def build(i: Inputs) -> Attempt:
        return Attempt(i.base, edit_config(i.adapter_copy(), peft_type=peft_type))

    return build


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(i: Inputs) -> Attempt:
    # The marker file would appear in the case's folder: "nothing left behind" also proves it never ran.
    adapter = i.adapter_copy()
    (adapter / "adapter_model.safetensors").unlink()
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({V_PROJ_A: _Exploit(str(i.tmp / "pwned"))}, f)
    return Attempt(i.base, adapter)


def _nan_in_adapter(i: Inputs) -> Attempt:
    def change(state: dict[str, torch.Tensor]) -> None:
        state[V_PROJ_A][0, 3] = float("nan")

    return Attempt(i.base, edit_weights(i.adapter_copy(), change))


def _base_with_pickle_weights_only(i: Inputs) -> Attempt:
    base = i.tmp / "pickled"
    base.mkdir()
    shutil.copy(i.base / "config.json", base / "config.json")
    torch.save(load_file(i.base / "model.safetensors"), base / "pytorch_model.bin")
    return Attempt(base, i.adapter)


def _rank_pattern_disagrees(i: Inputs) -> Attempt:
    return Attempt(i.base, edit_config(i.adapter_copy(), rank_pattern={"v_proj": 16}))


def _full_model_as_adapter(i: Inputs) -> Attempt:
    return Attempt(i.base, i.base)


def _output_exists(i: Inputs) -> Attempt:
    (i.tmp / "merged").mkdir()
    (i.tmp / "merged" / "keep.txt").write_text("mine")
    return Attempt(i.base, i.adapter)


def _not_enough_disk(i: Inputs) -> Attempt:
    usage = namedtuple("usage", "total used free")
    i.monkeypatch.setattr(merge_core.merge.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    return Attempt(i.base, i.adapter)


def _disk_fails_mid_write(i: Inputs) -> Attempt:
    calls = {"n": 0}
    original = merge_core.merge.StreamingWriter.write

    def flaky(self: Any, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        return original(self, tensor, *args, **kwargs)

    i.monkeypatch.setattr(merge_core.merge.StreamingWriter, "write", flaky)
    return Attempt(i.base, i.adapter, MergeOptions(max_shard_size=10_000))


MERGE_REFUSALS = [
    MergeRefusal(
        "target-module-missing-in-base",
        _target_missing_in_base,
        TargetModuleNotFoundError,
        ("model.layers.2.self_attn.q_proj", "acme/shallow"),
    ),
    MergeRefusal(
        "other-hidden-size-names-both-models",
        _other_hidden_size,
        AdapterBaseMismatchError,
        ("acme/narrow-32", "64", "[32, 32]"),
    ),
    MergeRefusal(
        "lora-b-of-another-shape",
        _lora_b_of_another_shape,
        ShapeMismatchError,
        ("model.layers.0.self_attn.q_proj", "[32, 32]"),
    ),
    *[
        MergeRefusal(f"peft-type-{t}-over-lora-weights", _peft_type(t), AdapterWeightsError, (t, "does not belong"))
        for t in ("IA3", "LOHA")
    ],
    MergeRefusal(
        "peft-type-PREFIX_TUNING",
        _peft_type("PREFIX_TUNING"),
        UnsupportedAdapterError,
        ("PREFIX_TUNING", "nothing to merge"),
    ),
    MergeRefusal("peft-type-unknown", _peft_type("NOT_A_PEFT_TYPE"), UnsupportedAdapterError, ("unknown to PEFT",)),
    MergeRefusal("malicious-pickle", _malicious_pickle, AdapterWeightsError, ("weights_only", "safetensors")),
    MergeRefusal("nan-in-adapter", _nan_in_adapter, NonFiniteAdapterWeightsError, (V_PROJ_A, "NaN")),
    MergeRefusal(
        "base-with-pickle-weights-only", _base_with_pickle_weights_only, BaseCheckpointError, ("pickle", "safetensors")
    ),
    MergeRefusal("rank-pattern-disagrees-with-weights", _rank_pattern_disagrees, AdapterConfigError, ("rank 16",)),
    MergeRefusal("full-model-as-adapter", _full_model_as_adapter, AdapterConfigError, ("swap base and adapter",)),
    MergeRefusal("output-exists", _output_exists, OutputExistsError, ("already exists",)),
    MergeRefusal("not-enough-disk", _not_enough_disk, InsufficientDiskError, ("GB", "free")),
    # The OS error is reported as one sentence that names the output (merge_core.errors.explain_os_error).
    MergeRefusal("disk-fails-mid-write", _disk_fails_mid_write, OutputWriteError, ("Could not write", "merged")),
]


@pytest.mark.parametrize("case", MERGE_REFUSALS, ids=lambda case: case.id)
def test_merge_refusal(
    case: MergeRefusal, tmp: Path, tiny_base: Path, tiny_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempt = case.build(Inputs(tmp, tiny_base, tiny_adapter, monkeypatch))
    before = tree_state(tmp, tiny_base, tiny_adapter)
    with pytest.raises(case.error) as err:
        merge_adapter(attempt.base, attempt.adapter, tmp / "merged", attempt.options)
    for word in case.words + attempt.words:
        assert word in str(err.value), str(err.value)
    assert tree_state(tmp, tiny_base, tiny_adapter) == before


# --- combinations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Combination:
    sources: list[AdapterSource]
    combination_type: str
    output: Path
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CombineRefusal:
    id: str
    build: Callable[[dict[str, Path], Path], Combination]
    error: type[BaseException]
    match: str  # a regular expression the message must match


def _src(adapters: dict[str, Path], name: str, weight: float = 1.0) -> AdapterSource:
    return AdapterSource(adapters[name], weight, name=name)


def _pair(first: str, second: str, ctype: str, **options: Any) -> Callable[[dict[str, Path], Path], Combination]:
    def build(a: dict[str, Path], tmp: Path) -> Combination:
        return Combination([_src(a, first), _src(a, second)], ctype, tmp / "o", options)

    return build


def _with_dora(*names: str, ctype: str) -> Callable[[dict[str, Path], Path], Combination]:
    def build(a: dict[str, Path], tmp: Path) -> Combination:
        dora = make_adapter(a["base"], tmp / "dora", seed=5, target_modules=["q_proj"], use_dora=True)
        return Combination([*(_src(a, n) for n in names), AdapterSource(dora)], ctype, tmp / "o")

    return build


def _twin(ctype: str) -> Callable[[dict[str, Path], Path], Combination]:
    def build(a: dict[str, Path], tmp: Path) -> Combination:
        twin = AdapterSource(with_config(a["a1"], tmp / "twin"), name="twin")
        return Combination([_src(a, "a1"), twin], ctype, tmp / "o")

    return build


def _other_declared_base(a: dict[str, Path], tmp: Path) -> Combination:
    other = with_config(a["a3"], tmp / "other", base_model_name_or_path="org/another-model")
    return Combination([_src(a, "a1"), AdapterSource(other)], "stack", tmp / "o")


def _embeddings_of_another_vocab(a: dict[str, Path], tmp: Path) -> Combination:
    small = make_base(tmp / "small", "llama", vocab=80)
    small_adapter = make_adapter(small, tmp / "small_a0", target_modules=["embed_tokens"])
    undeclared = [
        with_config(a["a1"], tmp / "nobase", base_model_name_or_path=None),
        with_config(small_adapter, tmp / "small_a", base_model_name_or_path=None),
    ]
    return Combination([AdapterSource(p) for p in undeclared], "stack", tmp / "o")


def _regex_targets(a: dict[str, Path], tmp: Path) -> Combination:
    regex = with_config(a["a3"], tmp / "regex", target_modules=r".*\.o_proj")
    return Combination([_src(a, "a1"), AdapterSource(regex)], "cat", tmp / "o")


COMBINE_REFUSALS = [
    CombineRefusal(
        "linear-needs-equal-ranks",
        _pair("a1", "d", "linear"),
        IncompatibleAdaptersError,
        r"equal rank.*a1: 4, d: 6.*'stack' or 'cat'",
    ),
    CombineRefusal(
        "dare-ties-needs-equal-ranks",
        _pair("a1", "d", "dare_ties", density=0.5),
        IncompatibleAdaptersError,
        "equal rank",
    ),
    CombineRefusal("dora-in-stack", _with_dora("a1", ctype="stack"), UnsupportedCombinationError, "DoRA.*leave it out"),
    CombineRefusal("dora-in-svd", _with_dora("a1", "a2", ctype="svd"), UnsupportedCombinationError, "DoRA"),
    CombineRefusal(
        "more-weights-than-adapters",
        lambda a, tmp: Combination([_src(a, "a1")], "stack", tmp / "o", {"weights": [1.0, 2.0]}),
        CombinationArgumentError,
        "2 weight.*1 adapter.*one weight per adapter",
    ),
    CombineRefusal(
        "unknown-type", _pair("a1", "d", "average"), UnknownCombinationTypeError, "'average'.*stack, linear, cat, svd"
    ),
    CombineRefusal(
        "no-adapters",
        lambda a, tmp: Combination([], "stack", tmp / "o"),
        CombinationArgumentError,
        "at least one adapter",
    ),
    CombineRefusal("ties-needs-density", _pair("a1", "a2", "ties"), CombinationArgumentError, "needs density"),
    CombineRefusal(
        "only-adapter-weighs-zero",
        lambda a, tmp: Combination([_src(a, "a1", 0.0)], "stack", tmp / "o"),
        CombinationArgumentError,
        "weight 0",
    ),
    CombineRefusal(
        "svd-rank-above-total", _pair("a1", "d", "svd", svd_rank=20), CombinationArgumentError, "svd_rank <= 16"
    ),
    CombineRefusal(
        "output-is-an-input",
        lambda a, tmp: Combination([_src(a, "a1"), _src(a, "d")], "stack", a["d"]),
        CombinationArgumentError,
        "output folder",
    ),
    CombineRefusal(
        "two-replace-lm-head-stack", _twin("stack"), IncompatibleAdaptersError, "both replace lm_head.*modules_to_save"
    ),
    CombineRefusal("two-replace-lm-head-cat", _twin("cat"), IncompatibleAdaptersError, "both replace lm_head"),
    CombineRefusal("other-declared-base", _other_declared_base, DifferentBaseModelsError, "share the base model"),
    CombineRefusal(
        "embeddings-of-another-vocabulary",
        _embeddings_of_another_vocab,
        DifferentBaseModelsError,
        "embed_tokens.*different base models",
    ),
    CombineRefusal("regex-and-list-targets-in-cat", _regex_targets, IncompatibleAdaptersError, "different kinds"),
]


@pytest.mark.parametrize("case", COMBINE_REFUSALS, ids=lambda case: case.id)
def test_combine_refusal(case: CombineRefusal, tmp: Path, adapter_set: dict[str, Path]) -> None:
    combination = case.build(adapter_set, tmp)
    before = tree_state(tmp, adapter_set["root"])
    with pytest.raises(case.error, match=case.match):
        combine_adapters(combination.sources, combination.combination_type, combination.output, **combination.options)
    assert tree_state(tmp, adapter_set["root"]) == before


def test_dora_adapter_of_weight_zero_is_left_out_of_a_stack(tmp: Path, adapter_set: dict[str, Path]) -> None:
    dora = make_adapter(adapter_set["base"], tmp / "dora", seed=5, target_modules=["q_proj"], use_dora=True)
    with pytest.warns(UserWarning, match="Left out.*dora"):
        combine_adapters([_src(adapter_set, "a1"), AdapterSource(dora, 0.0, name="dora")], "stack", tmp / "ok")
    assert not [k for k in load_file(tmp / "ok" / "adapter_model.safetensors") if "magnitude" in k]


# --- near misses: accepted, with the right outcome -------------------------------------------------


def test_overwrite_replaces_atomically(tmp: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    (tmp / "merged").mkdir()
    (tmp / "merged" / "stale.txt").write_text("old")
    merge_adapter(tiny_base, tiny_adapter, tmp / "merged", overwrite=True)
    assert not (tmp / "merged" / "stale.txt").exists()
    assert (tmp / "merged" / "model.safetensors").is_file()
    assert not [p for p in tmp.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_name_mismatch_with_matching_shapes_is_a_warning(tmp: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    report = merge_adapter(tiny_base, tiny_adapter, tmp / "merged", MergeOptions(base_name="someone/else"))
    assert any("someone/else" in w for w in report.warnings)


def test_writer_failure_with_many_blocks_in_flight_raises_instead_of_hanging(
    tmp: Path, tiny_base: Path, tiny_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Any, tensor: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(merge_core.merge.StreamingWriter, "write", broken)
    plan = build_plan(tiny_base, tiny_adapter)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            execute_plan(plan, tmp / "merged", block_elements=64)  # hundreds of tiny blocks
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever the merge raised
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    # Idle, the merge fails in well under a second; the limit only separates "raised" from "hung".
    worker.join(timeout=120)
    assert not worker.is_alive(), "the merge hung after the writer thread failed"
    assert isinstance(outcome.get("error"), OutputWriteError)
    assert tree_state(tmp) == {}
