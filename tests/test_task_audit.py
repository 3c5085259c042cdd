"""Adapters for tasks other than text generation, as PEFT trains them: the merged folder loads with the task's
Auto class, equals PeftModel(base, adapter), and its verification rows run (none skipped) and pass.

Each case is the usual training recipe on a tiny random base saved in the layout real checkpoints have (a
masked-LM BERT/RoBERTa, a bare ViTModel or CLIPModel, a causal-LM Llama, a BART for generation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from merge_core import MergeOptions, merge_adapter
from merge_core.plan import build_plan
from merge_core.verify import verify_merge
from tests import arch_models

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
_IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
_TOKENS = {"input_ids": _IDS, "attention_mask": torch.ones_like(_IDS)}
_PIXELS = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))}


def _bert(**extra: Any):
    from transformers import BertConfig

    return BertConfig(vocab_size=96, max_position_embeddings=64, **SMALL, **extra)


def _vit(**extra: Any):
    from transformers import ViTConfig

    return ViTConfig(image_size=16, patch_size=4, **SMALL, **extra)


def _wav2vec2():
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        vocab_size=32,
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=16,
        **SMALL,
    )


@dataclass
class Case:
    base: Callable[[], Any]  # the base checkpoint's model, as published
    trained: str  # the class training loaded it as
    auto: str  # the Auto class that loads the merged folder
    lora: dict[str, Any]
    inputs: dict[str, torch.Tensor]
    architecture: str
    labels: int | None = None
    out: Callable[[Any], torch.Tensor] = field(default=lambda o: o.logits)
    pad_note: bool = False  # config.json lacks the pad_token_id a decoder's classifier batches with


def _t(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


CASES = {
    # classifier.dense (hidden rows) then classifier.out_proj (labels): the reference was built with 2 labels
    "roberta-seq-cls-from-masked-lm": Case(
        lambda: _t("RobertaForMaskedLM")(
            _t("RobertaConfig")(vocab_size=96, max_position_embeddings=64, pad_token_id=1, **SMALL)
        ),
        "RobertaForSequenceClassification",
        "AutoModelForSequenceClassification",
        {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]},
        _TOKENS,
        "RobertaForSequenceClassification",
        labels=3,
    ),
    # a bare BertModel adapter (encoder.*) on a checkpoint that keeps the encoder under bert.*
    "bert-features-from-masked-lm": Case(
        lambda: _t("BertForMaskedLM")(_bert()),
        "BertModel",
        "AutoModel",
        {"task_type": "FEATURE_EXTRACTION", "target_modules": ["query", "value"]},
        _TOKENS,
        "BertForMaskedLM",
        out=lambda o: o.last_hidden_state,
    ),
    # PEFT's image classification recipe: no task_type, modules_to_save=["classifier"], a headless base
    "vit-image-cls-from-vit-model": Case(
        lambda: _t("ViTModel")(_vit()),
        "ViTForImageClassification",
        "AutoModelForImageClassification",
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"]},
        _PIXELS,
        "ViTForImageClassification",
        labels=5,
    ),
    # task_type SEQ_CLS, which transformers has no ViT class for: PEFT trains the image classifier all the same
    "vit-image-cls-as-seq-cls": Case(
        lambda: _t("ViTModel")(_vit()),
        "ViTForImageClassification",
        "AutoModelForImageClassification",
        {"task_type": "SEQ_CLS", "target_modules": ["q_proj", "v_proj"]},
        _PIXELS,
        "ViTForImageClassification",
        labels=5,
    ),
    "vit-image-cls-relabelled": Case(
        lambda: _t("ViTForImageClassification")(_vit(num_labels=10)),
        "ViTForImageClassification",
        "AutoModelForImageClassification",
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"]},
        _PIXELS,
        "ViTForImageClassification",
        labels=5,
    ),
    "clip-image-cls-from-clip-model": Case(
        lambda: _t("CLIPModel")(
            _t("CLIPConfig")(
                text_config={"vocab_size": 96, "max_position_embeddings": 64, **SMALL},
                vision_config={"image_size": 16, "patch_size": 4, **SMALL},
                projection_dim=16,
            )
        ),
        "CLIPForImageClassification",
        "AutoModelForImageClassification",
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"]},
        _PIXELS,
        "CLIPForImageClassification",
        labels=5,
    ),
    # no pad_token_id in config.json: LlamaForSequenceClassification refuses batches, the rows must still run
    "llama-seq-cls-from-causal-lm": Case(
        lambda: _t("LlamaForCausalLM")(
            _t("LlamaConfig")(vocab_size=96, num_key_value_heads=2, max_position_embeddings=64, **SMALL)
        ),
        "LlamaForSequenceClassification",
        "AutoModelForSequenceClassification",
        {"task_type": "SEQ_CLS", "target_modules": ["q_proj", "v_proj"]},
        {"input_ids": _IDS[:1]},
        "LlamaForSequenceClassification",
        labels=3,
        pad_note=True,
    ),
    "bart-seq-cls-classification-head": Case(
        arch_models.bart,
        "BartForSequenceClassification",
        "AutoModelForSequenceClassification",
        {"task_type": "SEQ_CLS", "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classification_head"]},
        {"input_ids": torch.cat([_IDS, torch.full((2, 1), 2)], dim=1)},
        "BartForSequenceClassification",
        labels=4,
    ),
    # the encoder of a speech seq2seq checkpoint: its inputs are log-mel features only, no decoder tokens
    "whisper-audio-cls-from-seq2seq": Case(
        arch_models.whisper,
        "WhisperForAudioClassification",
        "AutoModelForAudioClassification",
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier", "projector"]},
        {"input_features": torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))},
        "WhisperForAudioClassification",
        labels=4,
    ),
    # no task_type on a base that is a classifier already: its class says which head the labels belong to
    "xlm-r-seq-cls-relabelled-without-task-type": Case(
        lambda: _t("XLMRobertaForSequenceClassification")(
            _t("XLMRobertaConfig")(vocab_size=96, max_position_embeddings=64, pad_token_id=1, **SMALL)
        ),
        "XLMRobertaForSequenceClassification",
        "AutoModelForSequenceClassification",
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        _TOKENS,
        "XLMRobertaForSequenceClassification",
        labels=6,
    ),
    "wav2vec2-audio-cls-from-bare-model": Case(
        lambda: _t("Wav2Vec2Model")(_wav2vec2()),
        "Wav2Vec2ForSequenceClassification",
        "AutoModelForAudioClassification",
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier", "projector"]},
        {"input_values": torch.randn(2, 4000, generator=torch.Generator().manual_seed(5))},
        "Wav2Vec2ForSequenceClassification",
        labels=4,
    ),
}


def _trained(case: Case, base: Path) -> Any:
    torch.manual_seed(7)
    extra = {"num_labels": case.labels} if case.labels else {}
    return _t(case.trained).from_pretrained(base, ignore_mismatched_sizes=True, **extra)


def _train(case: Case, base: Path, adapter: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = _trained(case, base)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **case.lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))  # the trained head differs from any fresh one
    peft_model.save_pretrained(adapter)


def _merge(tmp: Path, case: Case) -> tuple[Path, Path, Path]:
    base, adapter, merged = tmp / "base", tmp / "adapter", tmp / "merged"
    torch.manual_seed(0)
    case.base().save_pretrained(base)
    _train(case, base, adapter)
    merge_adapter(base, adapter, merged, MergeOptions())
    return base, adapter, merged


@pytest.mark.parametrize("name", list(CASES))
def test_task_adapter_merges_into_a_model_its_auto_class_runs_as_peft_does(tmp: Path, name: str) -> None:
    from peft import PeftModel

    case = CASES[name]
    base, adapter, merged_dir = _merge(tmp, case)

    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == [case.architecture]
    if case.labels:
        assert len(config["id2label"]) == case.labels
    merged = getattr(__import__("transformers"), case.auto).from_pretrained(merged_dir).eval()
    reference = PeftModel.from_pretrained(_trained(case, base), adapter).eval()
    with torch.no_grad():
        want, got = case.out(reference(**case.inputs)), case.out(merged(**case.inputs))
    assert got.shape == want.shape
    assert float((want - got).abs().max()) <= 1e-4

    plan = build_plan(base, adapter, MergeOptions())
    assert any("no pad_token_id" in note for note in plan.notes) is case.pad_note, plan.notes
    rows = [c for c in verify_merge(plan, merged_dir, functional="always").checks if c.group == "function"]
    assert rows and all(r.passed for r in rows), [(r.name, r.passed, r.detail) for r in rows]
    assert case.architecture in rows[0].detail or case.trained in rows[0].detail
    # The head PEFT loads from the adapter is no weight "initialised alike in both".
    initialised = rows[0].detail.partition("initialised alike in both:")[2]
    assert not any(head in initialised for head in ("classifier", "score", "classification_head")), initialised


@pytest.mark.parametrize("saved", [[], ["pooler"]], ids=["pooler-lost", "pooler-saved"])
def test_head_weights_neither_model_holds_are_a_warning(tmp: Path, saved: list[str]) -> None:
    """DeBERTa's classifier reads a pooler that masked-LM checkpoints lack; unless the adapter saved it,
    every load draws it at random, and the merge says so."""
    deberta = Case(
        lambda: _t("DebertaV2ForMaskedLM")(_t("DebertaV2Config")(vocab_size=96, max_position_embeddings=64, **SMALL)),
        "DebertaV2ForSequenceClassification",
        "AutoModelForSequenceClassification",
        {"task_type": "SEQ_CLS", "target_modules": ["query_proj", "value_proj"], "modules_to_save": saved or None},
        _TOKENS,
        "DebertaV2ForSequenceClassification",
        labels=3,
    )
    base, adapter, _ = _merge(tmp, deberta)
    warnings = build_plan(base, adapter, MergeOptions()).warnings
    if saved:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "pooler.dense.bias, pooler.dense.weight" in warnings[0], warnings


def test_one_output_head_agreement_reads_the_sign_and_can_fail(tmp: Path) -> None:
    """num_labels=1 (regression, binary score): an argmax over one output always agrees, so the row compares
    signs; a merged head with its sign flipped fails it."""
    from safetensors.torch import load_file, save_file

    regression = Case(
        lambda: _t("BertModel")(_bert()),
        "BertForSequenceClassification",
        "AutoModelForSequenceClassification",
        {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]},
        _TOKENS,
        "BertForSequenceClassification",
        labels=1,
    )
    base, adapter, merged = _merge(tmp, regression)
    plan = build_plan(base, adapter, MergeOptions())

    def agreement() -> Any:
        rows = verify_merge(plan, merged, functional="always").checks
        return next(c for c in rows if c.name == "predicted-label agreement")

    row = agreement()
    assert row.passed is True and "sign" in row.detail, row
    state = load_file(merged / "model.safetensors")
    state.update({name: -state[name] for name in ("classifier.weight", "classifier.bias")})
    save_file(state, merged / "model.safetensors", metadata={"format": "pt"})
    row = agreement()
    assert row.passed is False and row.value == "0.00%", row


def test_untyped_head_on_a_model_with_several_heads_is_refused_with_what_to_set(tmp: Path) -> None:
    """No task_type, a classifier the bare BertModel lacks: sequence or token classifier cannot be told apart
    (both are classifier.weight [labels, hidden]), so the merge asks for task_type before writing anything."""
    from merge_core.errors import AdapterConfigError

    token_cls = Case(
        lambda: _t("BertModel")(_bert()),
        "BertForTokenClassification",
        "AutoModelForTokenClassification",
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        _TOKENS,
        "BertForTokenClassification",
        labels=4,
    )
    with pytest.raises(AdapterConfigError, match=r"names no task_type.*SEQ_CLS, TOKEN_CLS.*set task_type"):
        _merge(tmp, token_cls)
    assert not (tmp / "merged").exists()
