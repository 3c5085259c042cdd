"""The function rows follow the adapter's task: they pass on an exact merge and fail on a planted fault.

Each case is a tiny random model of its architecture (hidden 32, 2 layers), a LoRA saved by PEFT with
the task type real adapters of that kind carry, a merge by merge_core and its verification table.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core import MergeOptions, merge_adapter
from merge_core.errors import ModelLoadError
from merge_core.models import choose_model_class
from merge_core.plan import build_plan
from merge_core.tasks import FEATURE_ROWS, HEAD_ROWS, LOGIT_ROWS
from merge_core.verify import verify_merge
from tests.factories import make_adapter, make_base

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )


def bert_config(**extra: Any):
    from transformers import BertConfig

    return BertConfig(vocab_size=96, max_position_embeddings=64, **SMALL, **extra)


def bert_seq_cls():
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(bert_config(num_labels=3))


def bert_features():
    from transformers import BertModel

    return BertModel(bert_config())


def roberta_token_cls():
    from transformers import RobertaConfig, RobertaForTokenClassification

    return RobertaForTokenClassification(
        RobertaConfig(vocab_size=96, max_position_embeddings=64, num_labels=5, **SMALL)
    )


def whisper_config():
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=96,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_source_positions=32,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )


def whisper():
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(whisper_config())


def vit_image_cls():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_labels=4, **SMALL))


def wav2vec2_audio_cls():
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        vocab_size=32,
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=16,
        num_labels=3,
        **SMALL,
    )
    return Wav2Vec2ForSequenceClassification(config)


def bert_qa():
    from transformers import BertForQuestionAnswering

    return BertForQuestionAnswering(bert_config())


def clip_features():
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": 96, "max_position_embeddings": 64, **SMALL}
    vision = {"image_size": 16, "patch_size": 4, **SMALL}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {
        "vocab_size": 96,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **SMALL,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
    }
    vision = {
        "depth": 1,
        "embed_dim": 16,
        "hidden_size": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 4,
        "spatial_merge_size": 1,
        "temporal_patch_size": 1,
    }
    return Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=90,
            video_token_id=91,
            vision_start_token_id=92,
            vision_end_token_id=93,
        )
    )


@dataclass
class Case:
    build: Callable[[], Any] | None  # None: the Llama factories of tests/factories.py
    task_type: str | None
    targets: list[str]
    rows: list[str]
    model_class: str
    modules_to_save: list[str] = field(default_factory=list)
    fault: str = "scale"  # "scale": every merged tensor the adapter changed x 1.05; "head": the base's head back
    head: str = "classifier."
    lora: dict[str, Any] = field(default_factory=dict)  # more LoraConfig arguments


CASES = {
    "t5-seq2seq": Case(t5, "SEQ_2_SEQ_LM", ["q", "v"], LOGIT_ROWS, "T5ForConditionalGeneration"),
    "bert-seq-cls": Case(
        bert_seq_cls,
        "SEQ_CLS",
        ["query", "value"],
        HEAD_ROWS,
        "BertForSequenceClassification",
        ["classifier"],
        fault="head",
    ),
    "roberta-token-cls": Case(
        roberta_token_cls,
        "TOKEN_CLS",
        ["query", "value"],
        HEAD_ROWS,
        "RobertaForTokenClassification",
        ["classifier"],
        fault="head",
    ),
    "bert-features": Case(bert_features, "FEATURE_EXTRACTION", ["query", "value", "dense"], FEATURE_ROWS, "BertModel"),
    "whisper-speech": Case(whisper, None, ["q_proj", "v_proj"], LOGIT_ROWS, "WhisperForConditionalGeneration"),
    # transformers 5 names ViT's attention projections q_proj/v_proj (older checkpoints: query/value).
    "vit-image-cls": Case(
        vit_image_cls, None, ["q_proj", "v_proj"], HEAD_ROWS, "ViTForImageClassification", ["classifier"], fault="head"
    ),
    "wav2vec2-audio-cls": Case(
        wav2vec2_audio_cls,
        None,
        ["q_proj", "v_proj"],
        HEAD_ROWS,
        "Wav2Vec2ForSequenceClassification",
        ["classifier", "projector"],
        fault="head",
    ),
    "bert-question-answering": Case(
        bert_qa,
        "QUESTION_ANS",
        ["query", "value"],
        HEAD_ROWS,
        "BertForQuestionAnswering",
        ["qa_outputs"],
        fault="head",
        head="qa_outputs.",
    ),
    "clip-features": Case(clip_features, "FEATURE_EXTRACTION", ["q_proj", "v_proj"], FEATURE_ROWS, "CLIPModel"),
    # The usual VLM adapter says CAUSAL_LM; AutoModelForCausalLM has no Qwen2-VL, config.json decides.
    "qwen2-vl": Case(qwen2_vl, "CAUSAL_LM", ["q_proj", "v_proj"], LOGIT_ROWS, "Qwen2VLForConditionalGeneration"),
    "llama-causal": Case(None, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], LOGIT_ROWS, "LlamaForCausalLM"),
}


def save_adapter(model: Any, base: Path, path: Path, case: Case) -> None:
    """A LoRA with non-zero B (and a perturbed saved head), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    model.name_or_path = str(base)  # PEFT records it as the adapter's base_model_name_or_path
    torch.manual_seed(1)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=case.targets,
        modules_to_save=case.modules_to_save or None,
        task_type=case.task_type,
        init_lora_weights=False,
        **case.lora,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(path)


def merged_case(tmp: Path, case: Case) -> tuple[Any, Path]:
    base, adapter, out = tmp / "base", tmp / "adapter", tmp / "merged"
    if case.build is None:
        make_base(base, "llama")
        make_adapter(base, adapter, target_modules=case.targets, task_type=case.task_type)
    else:
        torch.manual_seed(0)
        model = case.build()
        model.save_pretrained(base)
        save_adapter(model, base, adapter, case)
    merge_adapter(base, adapter, out, MergeOptions())
    return build_plan(base, adapter, MergeOptions()), out


def plant(plan: Any, merged: Path, case: Case) -> None:
    path = merged / "model.safetensors"
    state = load_file(path)
    if case.fault == "scale":  # a wrong LoRA scale, everywhere the adapter acts
        changed = [t.name for t in plan.tensors if t.changed]
        state.update({name: state[name] * 1.05 for name in changed})
    else:  # the adapter's trained head lost: the base's head written back
        base = load_file(plan.base.path / "model.safetensors")
        state.update({name: base[name] for name in state if name.startswith(case.head)})
    save_file(state, path, metadata={"format": "pt"})


def function_rows(report: Any) -> dict[str, Any]:
    return {c.name: c for c in report.checks if c.group == "function"}


@pytest.mark.parametrize("name", list(CASES))
def test_function_rows_pass_on_the_merge_and_fail_on_a_fault(tmp: Path, name: str) -> None:
    case = CASES[name]
    plan, merged = merged_case(tmp, case)
    rows = function_rows(verify_merge(plan, merged, functional="always"))
    assert list(rows) == case.rows
    assert all(row.passed for row in rows.values()), [(r.name, r.status, r.value, r.detail) for r in rows.values()]
    assert case.model_class in rows[case.rows[0]].detail  # the task's own head was loaded
    assert float(rows["adapter changes the output"].value) > 1e-2

    plant(plan, merged, case)
    rows = function_rows(verify_merge(plan, merged, functional="always"))
    assert rows[case.rows[0]].passed is False, rows[case.rows[0]]


def as_transformers4_vit(adapter: Path) -> None:
    """Rewrite a ViT adapter the way transformers 4 named its modules (and the checkpoint still does)."""
    state = load_file(adapter / "adapter_model.safetensors")
    old = {"vit.layers.": "vit.encoder.layer.", ".q_proj.": ".attention.query.", ".v_proj.": ".attention.value."}

    def rename(key: str) -> str:
        for new, was in old.items():
            key = key.replace(new, was)
        return key

    save_file(
        {rename(k): v for k, v in state.items()}, adapter / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(target_modules=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"query": 16})
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_adapter_with_older_module_names_is_checked_under_the_models_names(tmp: Path) -> None:
    """PEFT finds no `query` in transformers 5's ViT; the reference renames the adapter the way transformers does."""
    from peft import PeftModel
    from transformers import ViTForImageClassification

    lora = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 16}}
    case = Case(vit_image_cls, None, ["q_proj", "v_proj"], HEAD_ROWS, "ViTForImageClassification", lora=lora)
    base, original, adapter, out = tmp / "base", tmp / "original", tmp / "adapter", tmp / "merged"
    torch.manual_seed(0)
    model = case.build()
    model.save_pretrained(base)
    save_adapter(model, base, original, case)
    shutil.copytree(original, adapter)
    as_transformers4_vit(adapter)
    merge_adapter(base, adapter, out, MergeOptions())
    plan = build_plan(base, adapter, MergeOptions())
    rows = function_rows(verify_merge(plan, out, functional="always"))
    assert all(row.passed for row in rows.values()), [(r.name, r.status, r.value, r.detail) for r in rows.values()]
    assert "vit.encoder.layer.0.attention.attention.query -> vit.layers.0.attention.q_proj" in rows[HEAD_ROWS[0]].detail
    # The renamed reference is PEFT's own model: the merge equals base + the adapter as PEFT saved it.
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        truth = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(base), original)(pixels).logits
        merged = ViTForImageClassification.from_pretrained(out)(pixels).logits
    assert torch.allclose(truth, merged, atol=1e-5)

    plant(plan, out, case)
    assert function_rows(verify_merge(plan, out, functional="always"))[HEAD_ROWS[0]].passed is False


def test_merged_model_that_does_not_load_fails_with_one_short_reason(tmp: Path) -> None:
    plan, merged = merged_case(tmp, CASES["bert-seq-cls"])
    config = json.loads((merged / "config.json").read_text())
    config["id2label"] = {str(i): f"L{i}" for i in range(7)}  # the saved head has 3 rows
    (merged / "config.json").write_text(json.dumps(config))
    rows = list(function_rows(verify_merge(plan, merged, functional="always")).values())
    assert [r.name for r in rows] == HEAD_ROWS and [r.passed for r in rows] == [False, None, None]
    assert rows[0].detail.startswith("The merged checkpoint's classifier.") and "expects [7" in rows[0].detail
    assert len(rows[0].detail) < 300 and "\n" not in rows[0].detail


def test_reference_that_cannot_be_built_gives_skipped_rows_with_one_short_reason(tmp: Path) -> None:
    plan, merged = merged_case(tmp, CASES["t5-seq2seq"])
    config = json.loads((plan.base.path / "config.json").read_text())
    (plan.base.path / "config.json").write_text(json.dumps(config | {"d_ff": 64}))  # the weights say 48
    rows = function_rows(verify_merge(plan, merged, functional="always"))
    assert list(rows) == LOGIT_ROWS
    for row in rows.values():
        assert row.passed is None and row.detail.startswith("skipped: the base checkpoint's ")
        assert "DenseReluDense" in row.detail and "has shape [48, 32]" in row.detail, row.detail
        assert len(row.detail) < 300 and "\n" not in row.detail


def test_classifier_with_more_labels_than_the_base_head_is_checked_as_trained(tmp: Path) -> None:
    """Training loaded the base with num_labels=3 over a 2-label head; the reference is built the same way."""
    from transformers import BertForSequenceClassification

    base, adapter, out = tmp / "base", tmp / "adapter", tmp / "merged"
    torch.manual_seed(0)
    BertForSequenceClassification(bert_config(num_labels=2)).save_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=3, ignore_mismatched_sizes=True)
    save_adapter(model, base, adapter, CASES["bert-seq-cls"])
    merge_adapter(base, adapter, out, MergeOptions())
    plan = build_plan(base, adapter, MergeOptions())
    config = json.loads((out / "config.json").read_text())
    if config.get("num_labels", len(config.get("id2label") or {0: 0, 1: 1})) != 3:
        # merge_core keeps the base's 2 labels in config.json: the merged folder does not load as is.
        first = function_rows(verify_merge(plan, out, functional="always"))[HEAD_ROWS[0]]
        assert first.passed is False and "classifier." in first.detail and "expects [2" in first.detail
    config["id2label"] = {str(i): f"L{i}" for i in range(3)}  # the config the merge should write
    (out / "config.json").write_text(json.dumps(config))
    rows = function_rows(verify_merge(plan, out, functional="always"))
    assert all(r.passed for r in rows.values()), [(r.name, r.value, r.detail) for r in rows.values()]


def test_rows_over_the_memory_budget_are_the_tasks_own_and_skipped(tmp: Path) -> None:
    plan, merged = merged_case(tmp, CASES["bert-features"])
    rows = function_rows(verify_merge(plan, merged, functional="auto", memory_budget=1000))
    assert list(rows) == FEATURE_ROWS and all(r.passed is None and "GB" in r.detail for r in rows.values())


def choice_for(tmp: Path, config: Any, task_type: str | None):
    config.save_pretrained(tmp)
    plan = SimpleNamespace(
        base=SimpleNamespace(path=tmp), adapter_config=SimpleNamespace(task_type=task_type), config=config.to_dict()
    )
    return choose_model_class(plan)  # type: ignore[arg-type]


def test_model_class_follows_task_type_and_architecture(tmp: Path) -> None:
    from transformers import AutoModelForSequenceClassification, Qwen2VLConfig

    whisper_cfg = whisper_config()
    whisper_cfg.architectures = ["WhisperForConditionalGeneration"]
    choice = choice_for(tmp / "w", whisper_cfg, "SEQ_2_SEQ_LM")  # AutoModelForSeq2SeqLM has no Whisper
    assert (choice.task, choice.model_class.__name__) == ("SPEECH_SEQ_2_SEQ", "WhisperForConditionalGeneration")

    headless = bert_config(architectures=["BertModel"])
    choice = choice_for(tmp / "b", headless, "SEQ_CLS")  # the task adds the head PEFT trained
    assert (choice.task, choice.model_class) == ("SEQ_CLS", AutoModelForSequenceClassification)

    classifier = bert_config(architectures=["BertForSequenceClassification"])
    choice = choice_for(tmp / "c", classifier, "CAUSAL_LM")  # a copied generative label does not replace the head
    assert (choice.task, choice.model_class.__name__) == ("SEQ_CLS", "BertForSequenceClassification")
    assert "task_type CAUSAL_LM does not fit it" in choice.reason

    from transformers import LlamaConfig

    llama = LlamaConfig(architectures=["LlamaForCausalLM"], **SMALL)
    choice = choice_for(tmp / "l", llama, "CAUSAL_LM")  # task and architecture agree: no "does not fit"
    assert (choice.task, choice.model_class.__name__) == ("CAUSAL_LM", "LlamaForCausalLM")
    assert choice.reason == "LlamaForCausalLM in config.json", choice.reason

    vlm = Qwen2VLConfig(architectures=["Qwen2VLForConditionalGeneration"])
    choice = choice_for(tmp / "v", vlm, "CAUSAL_LM")
    assert (choice.task, choice.model_class.__name__) == ("IMAGE_TEXT_TO_TEXT", "Qwen2VLForConditionalGeneration")

    unknown = bert_config(architectures=["NoSuchModelForAnything"])
    with pytest.raises(ModelLoadError, match="no model class NoSuchModelForAnything"):
        choice_for(tmp / "u", unknown, None)
