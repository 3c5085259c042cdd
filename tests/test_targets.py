"""Which modules an adapter touches: merge_core.targets against what PEFT itself wraps.

Each case is an adapter_config.json. PEFT loads it (LoraConfig.from_pretrained, as PeftModel
does) and wraps a freshly built tiny model with get_peft_model; our answer is computed from the
saved base checkpoint's tensor names only. Where PEFT refuses the config, ours must refuse too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from merge_core.adapter import load_adapter_config, load_adapter_weights, parse_adapter_config
from merge_core.checkpoint import load_base_checkpoint
from merge_core.errors import AdapterTargetError
from merge_core.targets import BaseModules, select_lora_modules, targeted_modules
from merge_core.tensor_names import OUTPUT_EMBEDDING_NAME, input_embedding
from tests.factories import make_adapter, make_base


def _config(arch: str, *, layers: int = 2, tie: bool = False):
    from transformers import GPT2Config, LlamaConfig, Olmo2Config, OPTConfig

    size = {"vocab_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4}
    if arch == "gpt2":
        return GPT2Config(n_embd=16, n_layer=layers, n_head=4, n_positions=32, vocab_size=64)
    if arch == "opt":
        return OPTConfig(hidden_size=16, ffn_dim=24, max_position_embeddings=32, word_embed_proj_dim=16, **size)
    cls = {"llama": LlamaConfig, "olmo2": Olmo2Config}[arch]
    return cls(
        hidden_size=16,
        intermediate_size=24,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        **size,
    )


def _model(arch: str, *, seq_cls: bool = False, **kwargs: Any):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    return auto.from_config(_config(arch, **kwargs))


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, Path]:
    """Saved checkpoints, built once per model shape the cases use."""
    root = tmp_path_factory.mktemp("bases")
    made: dict[tuple, Path] = {}
    for case in CASES:
        key = (case.arch, tuple(sorted(case.model.items())))
        if key not in made:
            made[key] = root / f"{case.arch}-{len(made)}"
            _model(case.arch, **case.model).save_pretrained(made[key])
    return made


def _peft_wrapped(arch: str, model_kwargs: dict[str, Any], raw: dict[str, Any], tmp: Path) -> set[str]:
    """The modules PEFT wraps for the adapter_config.json ``raw``, loaded as PeftModel loads it."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    (tmp / "adapter_config.json").write_text(json.dumps(raw))
    config = LoraConfig.from_pretrained(str(tmp))
    wrapped = get_peft_model(_model(arch, **model_kwargs), config)
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in wrapped.named_modules() if isinstance(module, LoraLayer)}


def _base_modules(base_dir: Path) -> tuple[BaseModules, str]:
    """What the planner has: the checkpoint's tensors, plus the tied lm_head it does not store."""
    base = load_base_checkpoint(base_dir)
    shapes = {name: tensor.info.shape for name, tensor in base.tensors.items()}
    embed = input_embedding(base)
    if base.tie_word_embeddings and OUTPUT_EMBEDDING_NAME not in shapes and embed is not None:
        shapes[OUTPUT_EMBEDDING_NAME] = shapes[embed]
    return BaseModules.from_tensors(shapes), base.model_type


@dataclass(frozen=True)
class Case:
    id: str
    arch: str
    config: dict[str, Any]  # adapter_config.json keys besides peft_type/r/lora_alpha/task_type
    model: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # a word our refusal must contain when PEFT refuses


_QKV = ["q_proj", "k_proj", "v_proj"]
_LINEAR_3 = [
    f"model.layers.{i}.{kind}.{leaf}"
    for i in range(3)
    for kind, leaves in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    )
    for leaf in leaves
]
CASES = [
    # --- which modules ---
    Case("list-suffixes", "llama", {"target_modules": ["q_proj", "down_proj"]}),
    Case("list-duplicated-entries", "llama", {"target_modules": ["v_proj", "v_proj", "o_proj", "o_proj"]}),
    Case("list-full-module-name", "llama", {"target_modules": ["model.layers.1.mlp.up_proj"]}),
    Case("list-embedding-and-head", "llama", {"target_modules": ["embed_tokens", "lm_head"]}),
    Case("list-tied-head-not-stored", "llama", {"target_modules": ["lm_head", "q_proj"]}, {"tie": True}),
    Case("regex-full-match", "llama", {"target_modules": r".*\.layers\.1\.self_attn\.(k|o)_proj"}),
    Case("regex-partial-name-does-not-match", "llama", {"target_modules": r"q_proj|.*mlp\.up_proj"}),
    Case("target-modules-key-absent-llama", "llama", {}),
    Case("target-modules-null-opt", "opt", {"target_modules": None}),
    Case("target-modules-absent-gpt2-conv1d", "gpt2", {}),
    Case("all-linear-llama", "llama", {"target_modules": "all-linear"}),
    Case("all-linear-upper-case-tied", "llama", {"target_modules": "ALL-LINEAR"}, {"tie": True}),
    Case("all-linear-gpt2", "gpt2", {"target_modules": "all-linear"}),
    Case("all-linear-opt", "opt", {"target_modules": "all-linear"}),
    # PEFT shortens a list of 20+ names to suffixes before matching, and only then does the layer filter apply
    Case(
        "long-list-condensed-then-layer-filter",
        "llama",
        {"target_modules": _LINEAR_3, "layers_to_transform": [0]},
        {"layers": 3},
    ),
    Case(
        "short-list-full-names-skip-layer-filter",
        "llama",
        {"target_modules": _LINEAR_3[:19], "layers_to_transform": [0]},
        {"layers": 3},
    ),
    Case("exclude-modules-list", "llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj", "q_proj"]}),
    Case("exclude-modules-regex", "llama", {"target_modules": _QKV, "exclude_modules": r".*layers\.0\..*"}),
    Case("layers-to-transform-int", "llama", {"target_modules": _QKV, "layers_to_transform": 1}),
    Case(
        "layers-to-transform-list-and-pattern",
        "llama",
        {"target_modules": _QKV, "layers_to_transform": [0, 2], "layers_pattern": "layers"},
        {"layers": 3},
    ),
    Case(
        "layers-pattern-list",
        "opt",
        {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]},
    ),
    Case(
        "modules-to-save-not-adapted",
        "llama",
        {"target_modules": ["lm_head", "q_proj"], "modules_to_save": ["lm_head"]},
    ),
    Case("unknown-model-type-with-targets", "olmo2", {"target_modules": ["q_proj"]}),
    # PeftModelForSequenceClassification saves its head (score) whole and never adapts it
    Case("seq-cls-all-linear-leaves-the-head", "llama", {"target_modules": "all-linear"}, {"seq_cls": True}),
    Case("seq-cls-head-in-targets", "llama", {"target_modules": ["score", "o_proj"]}, {"seq_cls": True}),
    # --- where PEFT refuses the adapter ---
    Case("regex-matching-nothing", "llama", {"target_modules": r".*\.attention\.wq"}, refused="match no module"),
    Case("list-matching-nothing", "llama", {"target_modules": ["query", "value"]}, refused="match no module"),
    Case("empty-target-list", "llama", {"target_modules": []}, refused="empty"),
    Case("all-excluded", "llama", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, refused="exclude"),
    Case(
        "only-modules-to-save",
        "llama",
        {"target_modules": ["lm_head"], "modules_to_save": ["lm_head"]},
        refused="modules_to_save",
    ),
    Case(
        "layers-pattern-matching-nothing",
        "llama",
        {"target_modules": _QKV, "layers_to_transform": [0], "layers_pattern": "blocks"},
        refused=r"layers \[0\] \(layers_pattern 'blocks'\)",
    ),
    Case(
        "layer-index-beyond-the-model",
        "llama",
        {"target_modules": _QKV, "layers_to_transform": [7]},
        refused=r"layers \[7\]",
    ),
    Case("unknown-model-type-without-targets", "olmo2", {}, refused="no default targets"),
    Case(
        "all-linear-with-layers-to-transform",
        "llama",
        {"target_modules": "all-linear", "layers_to_transform": [0]},
        refused="layers_to_transform",
    ),
    Case(
        "regex-with-layers-to-transform",
        "llama",
        {"target_modules": ".*q_proj", "layers_to_transform": [0]},
        refused="layers_to_transform",
    ),
    Case(
        "layers-pattern-without-layers",
        "llama",
        {"target_modules": _QKV, "layers_pattern": "layers"},
        refused="layers_pattern",
    ),
    Case("seq-cls-only-the-head", "llama", {"target_modules": ["score"]}, {"seq_cls": True}, refused="modules_to_save"),
    Case("target-is-a-norm", "llama", {"target_modules": ["norm"]}, refused="normalization"),
    Case("target-is-a-block", "llama", {"target_modules": ["mlp"]}, refused="block of layers"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_targeted_modules_equal_what_peft_wraps(case: Case, bases: dict[tuple, Path], tmp_path: Path) -> None:
    task = "SEQ_CLS" if case.model.get("seq_cls") else "CAUSAL_LM"
    raw = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "task_type": task, **case.config}
    modules, model_type = _base_modules(bases[(case.arch, tuple(sorted(case.model.items())))])
    if case.refused is not None:
        with pytest.raises((ValueError, TypeError)):
            _peft_wrapped(case.arch, case.model, raw, tmp_path)
        with pytest.raises(AdapterTargetError, match=case.refused) as refusal:
            targeted_modules(parse_adapter_config(raw), modules, model_type=model_type)
        assert refusal.value.args[0].count("; ") == 1  # one sentence: the reason; what to do
        return
    expected = _peft_wrapped(case.arch, case.model, raw, tmp_path)
    assert expected  # a case PEFT accepts wraps something
    assert targeted_modules(parse_adapter_config(raw), modules, model_type=model_type) == expected


def test_weights_for_untargeted_modules_are_ignored_as_peft_ignores_them(tmp_path: Path) -> None:
    """An adapter trained on q and v whose config now targets only q: PEFT loads q and drops v."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from tests.factories import load_model

    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "target_modules": ["q_proj"]}))
    peft_model = PeftModel.from_pretrained(load_model(base), adapter)
    loaded = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}

    weights = load_adapter_weights(adapter)
    modules, model_type = _base_modules(base)
    selection = select_lora_modules(
        load_adapter_config(adapter), weights.lora_modules, modules=modules, model_type=model_type
    )
    assert set(selection.applied) == loaded == selection.targeted
    assert selection.ignored == tuple(sorted(n for n in weights.lora_modules if n.endswith("v_proj")))
    assert selection.note() is not None and "2 module(s) its config does not target" in selection.note()


def test_adapter_names_resolve_to_base_names(tmp_path: Path) -> None:
    """The planner passes the base module each adapter module resolves to; matching runs on that name."""
    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    weights = load_adapter_weights(adapter)
    renamed = {f"decoder.{name}": module for name, module in weights.lora_modules.items()}  # another prefix
    resolved = {f"decoder.{name}": name for name in weights.lora_modules}
    modules, model_type = _base_modules(base)
    config = parse_adapter_config(
        {"peft_type": "LORA", "r": 4, "target_modules": r"model\.layers\.\d+\.self_attn\.q_proj"}
    )

    selection = select_lora_modules(config, renamed, modules=modules, model_type=model_type, resolved=resolved)
    assert set(selection.applied) == set(renamed) and selection.ignored == ()
    unresolved = select_lora_modules(config, renamed, modules=modules, model_type=model_type)
    assert unresolved.applied == {} and set(unresolved.ignored) == set(renamed)


def test_missing_target_modules_hint_names_the_adapters_layers(tmp_path: Path) -> None:
    base = tmp_path / "olmo2"
    _model("olmo2").save_pretrained(base)
    modules, model_type = _base_modules(base)
    adapter = make_adapter(make_base(tmp_path / "llama"), tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdapterTargetError, match=r'add "target_modules": \["q_proj", "v_proj"\]'):
        select_lora_modules(
            parse_adapter_config({"peft_type": "LORA", "r": 4}),
            load_adapter_weights(adapter).lora_modules,
            modules=modules,
            model_type=model_type,
        )


def test_quantization_side_tensors_are_no_modules() -> None:
    shapes = {
        "model.layers.0.q_proj.weight": (32, 1),
        "model.layers.0.q_proj.weight.absmax": (4,),
        "model.layers.0.q_proj.weight.quant_state.bitsandbytes__nf4": (100,),
        "model.norm.weight": (16,),
    }
    modules = BaseModules.from_tensors(shapes)
    assert modules.names == ("model", "model.layers", "model.norm", "model.layers.0", "model.layers.0.q_proj")


def test_renamed_layout_is_matched_in_the_model_class_names(tmp_path: Path) -> None:
    """A Qwen2.5-VL checkpoint says model.layers.*, its class (and PEFT) model.language_model.layers.*."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from merge_core.layouts import model_names

    text = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 96,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 32,
        "fullatt_block_indexes": [0],
    }
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).save_pretrained(
        tmp_path / "base"
    )
    target = r".*language_model.*\.(q_proj|down_proj)"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=target, init_lora_weights=False))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    peft_model.save_pretrained(tmp_path / "adapter")

    base = load_base_checkpoint(tmp_path / "base")
    shapes = {name: tensor.info.shape for name, tensor in base.tensors.items()}
    renamed = model_names(base.path, shapes)
    assert not any(name.startswith("model.language_model.") for name in shapes)  # the layouts really differ
    modules = BaseModules.from_tensors(shapes, renamed=renamed)
    config = load_adapter_config(tmp_path / "adapter")
    assert targeted_modules(config, modules, model_type=base.model_type) == wrapped

    lora_modules = load_adapter_weights(tmp_path / "adapter").lora_modules
    resolved = {name: renamed[f"{name}.weight"].removesuffix(".weight") for name in lora_modules}  # as the planner
    selection = select_lora_modules(
        config, lora_modules, modules=modules, model_type=base.model_type, resolved=resolved
    )
    assert set(selection.applied) == wrapped and selection.ignored == ()
    with pytest.raises(AdapterTargetError, match="match no module"):  # what the checkpoint's own names would say
        targeted_modules(config, BaseModules.from_tensors(shapes), model_type=base.model_type)
