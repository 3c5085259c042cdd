"""combine_adapters: several PEFT LoRA adapters -> one PEFT adapter folder whose merge is the combination.

Ground truth is PEFT itself: "stack" against PeftModel with all adapters loaded and merged, every
other type against LoraModel.add_weighted_adapter (same inputs, same torch.manual_seed).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from merge_core import merge_adapter
from merge_core.combine import (
    COMBINATION_TYPES,
    RECIPE_FILE,
    AdapterSource,
    CombinationArgumentError,
    IncompatibleAdaptersError,
    UnsupportedCombinationError,
    combine_adapters,
    read_recipe,
)
from merge_core.combine.replay import heuristic_key, named_modules_of
from merge_core.errors import AdapterConfigError, AdapterWeightsError
from tests.conftest import with_config
from tests.factories import load_model, logits, make_adapter, make_base, prompt_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
TOL = 1e-5
SEED = 1234


@pytest.fixture
def env(adapter_set: dict[str, Path]) -> dict[str, Path]:
    """conftest's adapter_set (a1/a2/a3 rank 4, d rank 6, a1_init/a3_gauss), read-only."""
    return adapter_set


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _peft_loaded(base: Path, adapters: list[tuple[str, Path]]):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_model(base), adapters[0][1], adapter_name=adapters[0][0])
    for name, path in adapters[1:]:
        pm.load_adapter(path, adapter_name=name)
    return pm


def _merge_folder(base: Path, folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base), folder).merge_and_unload()


def _peft_weighted(base: Path, adapters: list[tuple[str, Path]], weights, ctype: str, **kw):
    pm = _peft_loaded(base, adapters)
    torch.manual_seed(SEED)
    pm.add_weighted_adapter([n for n, _ in adapters], weights, "combo", combination_type=ctype, **kw)
    pm.set_adapter("combo")
    return pm.merge_and_unload(adapter_names=["combo"])


# --- stack -------------------------------------------------------------------------------------------


def test_stack_equals_peft_merging_both_adapters(env, tmp: Path) -> None:
    base = env["base"]
    out = combine_adapters([AdapterSource(env["a1"], name="a"), AdapterSource(env["d"], name="b")], "stack", tmp / "c")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (10, 10, False)
    assert cfg["modules_to_save"] == ["lm_head"]
    assert cfg["target_modules"] == sorted({"q_proj", "v_proj", "down_proj", "embed_tokens", "gate_proj"})
    assert "lora_merge_space" not in cfg  # the recipe lives beside the config, not in it
    recipe = read_recipe(out)
    assert recipe["combination_type"] == "stack" and recipe["weights"] == [1.0, 1.0]
    assert [s["name"] for s in recipe["sources"]] == ["a", "b"]

    ref = _peft_loaded(base, [("a", env["a1"]), ("b", env["d"])]).merge_and_unload(adapter_names=["a", "b"])
    got = _merge_folder(base, out)
    assert _max_diff(_state(ref), _state(got)) <= TOL
    ids = prompt_ids()
    assert (logits(ref, ids) - logits(got, ids)).abs().max().item() <= 1e-4
    # Both adapters matter: each alone gives something else.
    only_a = _peft_loaded(base, [("a", env["a1"])]).merge_and_unload()
    assert (logits(only_a, ids) - logits(ref, ids)).abs().max().item() > 1e-2

    # Our own streaming merge of the combined folder gives the same model.
    merge_adapter(base, out, tmp / "merged")
    ours = load_model(tmp / "merged")
    assert (logits(ours, ids) - logits(ref, ids)).abs().max().item() <= 1e-4


def test_stack_weights_equal_peft_cat(env, tmp: Path) -> None:
    srcs = [AdapterSource(env["d"], 0.5), AdapterSource(env["a3"], -1.5)]
    out = combine_adapters(srcs, "stack", tmp / "c")
    ref = _peft_weighted(env["base"], [("d", env["d"]), ("a3", env["a3"])], [0.5, -1.5], "cat")
    assert _max_diff(_state(ref), _state(_merge_folder(env["base"], out))) <= TOL


def test_picking_one_adapter_of_three_leaves_the_others_out(env, tmp: Path) -> None:
    base = env["base"]
    only = _state(_peft_loaded(base, [("a2", env["a2"])]).merge_and_unload())
    picked = combine_adapters(
        [AdapterSource(env["a1"], 0.0), AdapterSource(env["a2"], 1.0), AdapterSource(env["a3"], 0.0)],
        "stack",
        tmp / "p",
    )
    cfg = json.loads((picked / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["modules_to_save"] is None  # a1's lm_head left out with a1
    assert _max_diff(only, _state(_merge_folder(base, picked))) <= TOL
    single = combine_adapters([AdapterSource(env["a2"])], "stack", tmp / "s")
    assert _max_diff(only, _state(_merge_folder(base, single))) <= TOL


def test_stack_sums_lora_biases(tmp: Path) -> None:
    base = make_base(tmp / "base", "qwen2")
    b1 = make_adapter(base, tmp / "b1", seed=1, target_modules=["q_proj", "v_proj"], lora_bias=True)
    b2 = make_adapter(base, tmp / "b2", seed=2, r=2, target_modules=["q_proj", "k_proj"], lora_bias=True)
    out = combine_adapters([AdapterSource(b1, name="a"), AdapterSource(b2, name="b")], "stack", tmp / "c")
    ref = _peft_loaded(base, [("a", b1), ("b", b2)]).merge_and_unload(adapter_names=["a", "b"])
    assert _max_diff(_state(ref), _state(_merge_folder(base, out))) <= TOL
    with pytest.raises(UnsupportedCombinationError, match="lora_bias.*'stack'"):
        combine_adapters([AdapterSource(b1), AdapterSource(b2)], "cat", tmp / "o")


# --- PEFT add_weighted_adapter types -------------------------------------------------------------------

PEFT_CASES = {
    "linear": (["a1", "a2", "a3"], [0.7, -0.4, 1.2], {}),
    "ties": (["a1", "a2", "a3"], [1.0, 0.6, 0.8], dict(density=0.5)),
    "dare_linear": (["a3_gauss", "a1", "a2"], [0.9, 0.5, -0.7], dict(density=0.6)),
    "dare_ties": (["a1_init", "a2", "a3"], [1.0, 0.8, 0.6], dict(density=0.5, majority_sign_method="frequency")),
    "magnitude_prune": (["a2", "a3"], [0.6, 1.1], dict(density=0.4)),
    "cat": (["d", "a1", "a2"], [0.5, 1.0, -0.8], {}),
    "svd": (["a2", "d", "a1"], [1.0, 0.7, 0.4], {}),  # first adapter rsLoRA: PEFT's scale quirk
    "ties_svd": (["a1", "d"], [1.0, 0.9], dict(density=0.5, svd_rank=3, svd_clamp=0.95)),
    "dare_linear_svd": (["d", "a1", "a3"], [0.8, 0.6, 1.0], dict(density=0.6)),
    "dare_ties_svd": (["a1_init", "a2", "d"], [1.0, 0.5, 0.7], dict(density=0.7, svd_rank=5)),
    "magnitude_prune_svd": (["a3", "d"], [1.0, 1.0], dict(density=0.4, svd_clamp=0.9)),
}


def test_every_peft_type_is_covered() -> None:
    assert set(PEFT_CASES) == set(COMBINATION_TYPES) - {"stack"}


@pytest.mark.parametrize("ctype", list(PEFT_CASES))
def test_matches_peft_add_weighted_adapter(env, tmp: Path, ctype: str) -> None:
    names, weights, kw = PEFT_CASES[ctype]
    out = combine_adapters(
        [AdapterSource(env[n], w, n) for n, w in zip(names, weights, strict=True)], ctype, tmp / "c", seed=SEED, **kw
    )
    ref = _peft_weighted(env["base"], [(n, env[n]) for n in names], weights, ctype, **kw)
    got = _merge_folder(env["base"], out)
    diff = _max_diff(_state(ref), _state(got))
    assert diff <= TOL, f"{ctype}: merged weights differ from PEFT by {diff}"
    # ...and the combination really changed the model.
    assert _max_diff(_state(load_model(env["base"])), _state(got)) > 1e-2
    recipe = read_recipe(out)
    assert recipe["combination_type"] == ctype and recipe["weights"] == weights
    if ctype.startswith("dare"):
        assert recipe["parameters"]["seed"] == SEED
        assert recipe["module_order"].startswith("named_modules()")


def test_dare_is_reproducible_and_seed_dependent(env, tmp: Path) -> None:
    srcs = [AdapterSource(env["a1"]), AdapterSource(env["a2"])]
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    x = combine_adapters(srcs, "dare_linear", tmp / "x", density=0.5, seed=1)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is untouched
    y = combine_adapters(srcs, "dare_linear", tmp / "y", density=0.5, seed=1)
    z = combine_adapters(srcs, "dare_linear", tmp / "z", density=0.5, seed=2)
    from safetensors.torch import load_file

    fx, fy, fz = (load_file(p / "adapter_model.safetensors") for p in (x, y, z))
    assert all(torch.equal(fx[k], fy[k]) for k in fx)
    assert any(not torch.equal(fx[k], fz[k]) for k in fx)
    assert all(v.dtype == torch.float32 for v in fx.values())


def test_regex_targets_and_reduced_svd(env, tmp: Path, monkeypatch) -> None:
    base = env["base"]
    r1 = make_adapter(base, tmp / "r1", seed=7, target_modules=r".*\.(q_proj|v_proj)")
    r2 = make_adapter(base, tmp / "r2", seed=8, r=2, target_modules=r".*layers\.1\..*(o_proj|up_proj)")
    pair = [("r1", r1), ("r2", r2)]
    out = combine_adapters([AdapterSource(p, 0.8, n) for n, p in pair], "cat", tmp / "cat")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == "(.*\\.(q_proj|v_proj))|(.*layers\\.1\\..*(o_proj|up_proj))"
    ref = _peft_weighted(base, pair, [0.8, 0.8], "cat")
    assert _max_diff(_state(ref), _state(_merge_folder(base, out))) <= TOL
    # Huge layers take the reduced SVD (PEFT's full one would not fit in memory): same result up to rounding.
    monkeypatch.setattr("merge_core.combine.peft_ops.FULL_SVD_LIMIT", 0)
    out = combine_adapters([AdapterSource(p, 0.8, n) for n, p in pair], "svd", tmp / "svd", svd_rank=3)
    assert "Reduced SVD" in " ".join(read_recipe(out)["notes"])
    ref = _peft_weighted(base, pair, [0.8, 0.8], "svd", svd_rank=3)
    assert _max_diff(_state(ref), _state(_merge_folder(base, out))) <= TOL


@pytest.mark.parametrize("ctype", ["dare_ties_svd", "ties"])
def test_gpt2_conv1d_fan_in_fan_out(tmp: Path, ctype: str) -> None:
    base = make_base(tmp / "base", "gpt2")
    g1 = make_adapter(base, tmp / "g1", seed=1, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    g2 = make_adapter(base, tmp / "g2", seed=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    kw = dict(density=0.6)
    out = combine_adapters([AdapterSource(g1, 1.0), AdapterSource(g2, 0.7)], ctype, tmp / "c", seed=SEED, **kw)
    ref = _peft_weighted(base, [("g1", g1), ("g2", g2)], [1.0, 0.7], ctype, **kw)
    assert _max_diff(_state(ref), _state(_merge_folder(base, out))) <= TOL


def test_module_order_matches_named_modules(env, tmp: Path) -> None:
    base_gpt2 = make_base(tmp / "gpt2", "gpt2")
    for base, leaves in ((env["base"], ("_proj",)), (base_gpt2, ("c_attn", "c_proj", "c_fc", "wte"))):
        order = named_modules_of(base, "CAUSAL_LM")
        lora_like = [n for n in order if n.endswith(leaves) or n.endswith(("embed_tokens", "lm_head"))]
        assert len(lora_like) > 5
        assert sorted(lora_like, key=heuristic_key) == lora_like  # the fallback agrees on common models
        assert sorted(lora_like) != lora_like  # ...where file (alphabetical) order does not


# --- the combined folder: a plain PEFT adapter, its recipe beside it ---------------------------------


def _unexpected_keyword_warnings(base: Path, folder: Path) -> list[str]:
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(load_model(base), folder)
    return [str(w.message) for w in caught if "Unexpected keyword" in str(w.message)]


def test_peft_loads_the_combined_adapter_without_warnings(env, tmp: Path) -> None:
    out = combine_adapters(
        [AdapterSource(env["a1"], 0.5, "a1"), AdapterSource(env["a3"], 1.0, "a3")], "ties", tmp / "c", density=0.5
    )
    assert _unexpected_keyword_warnings(env["base"], out) == []
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe == read_recipe(out)
    assert recipe["parameters"] == {"density": 0.5, "majority_sign_method": "total"}
    assert [(s["name"], s["weight"]) for s in recipe["sources"]] == [("a1", 0.5), ("a3", 1.0)]
    # The check sees the warning when there is one: the recipe key where it used to be.
    legacy = with_config(out, tmp / "legacy", lora_merge_space=recipe)
    assert _unexpected_keyword_warnings(env["base"], legacy)
    assert read_recipe(env["a1"]) == {}  # a plain adapter has no recipe


def _card(report, adapter_id: str) -> str:
    from merge_core.card import build_model_card

    card = build_model_card(
        report, None, repo_id=None, base_id="org/base", base_revision=None, adapter_id=adapter_id, adapter_revision=None
    )
    return str(card)


def test_the_model_card_shows_the_recipe(env, tmp: Path) -> None:
    out = combine_adapters(
        [AdapterSource(env["a2"], 0.7, "org/a2"), AdapterSource(env["d"], -0.25, "org/d")], "svd", tmp / "c", svd_rank=3
    )
    report = merge_adapter(env["base"], out, tmp / "merged")
    assert report.recipe == read_recipe(out)  # the executor records the recipe beside the adapter
    recipe_section = _card(report, "svd(org/a2, org/d)").split("## Merge recipe", 1)[1]
    for words in ("`svd`", "`org/a2` × 0.7", "`org/d` × -0.25", "svd_rank=3"):
        assert words in recipe_section
    report.recipe = {}
    assert "combination" not in _card(report, "org/a2")


# --- refusals -----------------------------------------------------------------------------------------
# The refusals shared with merges (ranks, DoRA, weights, bases, modules_to_save, ...) are one case each
# in tests/test_bad_inputs.py (COMBINE_REFUSALS); these are the combination's own rules and parameters.


def _edited_weights(env: dict[str, Path], tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    folder = with_config(env["a3"], tmp / "cut")
    state = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("o_proj.lora_B.weight"))
    state[key] = state[key][:, :3].contiguous()
    save_file(state, folder / "adapter_model.safetensors")
    return folder


REFUSALS = {
    # id: (first adapter or a builder, combination type, options, error, words)
    "svd-clamp-above-1": ("a1", "svd", dict(svd_clamp=1.5), CombinationArgumentError, "svd_clamp is a quantile"),
    "unknown-sign-method": (
        "a1",
        "ties",
        dict(density=0.5, majority_sign_method="median"),
        CombinationArgumentError,
        "majority_sign_method must be 'total' or 'frequency'",
    ),
    "density-above-1": ("a1", "dare_linear", dict(density=1.5), CombinationArgumentError, "between 0 and 1"),
    "negative-svd-rank": ("a1", "svd", dict(svd_rank=-1), CombinationArgumentError, "svd_rank must be a positive"),
    "first-trains-base-biases": (
        lambda e, t: with_config(e["a1"], t / "x", bias="all"),
        "linear",
        {},
        IncompatibleAdaptersError,
        "bias != 'none'",
    ),
    "first-rewrites-the-base": (
        lambda e, t: with_config(e["a1"], t / "x", init_lora_weights="olora"),
        "linear",
        {},
        UnsupportedCombinationError,
        "init_lora_weights='olora'",
    ),
    "other-layers-to-transform": (
        lambda e, t: with_config(e["a1"], t / "x", layers_to_transform=[0]),
        "cat",
        {},
        IncompatibleAdaptersError,
        "layers_to_transform",
    ),
    "fan-in-fan-out-disagrees": (
        lambda e, t: with_config(e["a1"], t / "x", fan_in_fan_out=True),
        "stack",
        {},
        IncompatibleAdaptersError,
        "fan_in_fan_out",
    ),
    "weight-tying": (
        lambda e, t: with_config(e["a1"], t / "x", ensure_weight_tying=True),
        "stack",
        {},
        UnsupportedCombinationError,
        "ensure_weight_tying",
    ),
    "config-rank-not-the-weights": (
        lambda e, t: with_config(e["a1"], t / "x", r=8),
        "stack",
        {},
        AdapterConfigError,
        r"Adapter 'first': .*says rank 8 .* weights have rank 4",
    ),
    "a-and-b-ranks-differ": (
        _edited_weights,
        "stack",
        {},
        AdapterWeightsError,
        r"Adapter 'first': .*o_proj: lora_A has rank 4 but lora_B",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal(env, tmp: Path, case: str) -> None:
    first, ctype, options, error, words = REFUSALS[case]
    first_dir = env[first] if isinstance(first, str) else first(env, tmp)
    sources = [AdapterSource(first_dir, 1.0, "first"), AdapterSource(env["a3"], 0.5, "second")]
    with pytest.raises(error, match=words):
        combine_adapters(sources, ctype, tmp / "o", **options)
    assert not (tmp / "o").exists()  # nothing is written when a combination is refused
