"""Classification adapters bring their head: a base without it (or with another label count)
merges into the task's model class with the trained head, as PeftModel computes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_core import merge_adapter


def _bert_config(**kwargs):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        **kwargs,
    )


def _classifier_adapter(base: Path, out: Path, *, num_labels: int, model_cls) -> Path:
    from peft import LoraConfig, TaskType, get_peft_model

    model = model_cls.from_pretrained(base, num_labels=num_labels, ignore_mismatched_sizes=True)
    torch.manual_seed(3)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # train the LoRA factors and the saved head
    peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("base_cls", "base_labels", "labels"),
    [
        ("BertForPreTraining", None, 3),  # bert-base-uncased's layout: pooler and MLM heads, no classifier
        ("BertForSequenceClassification", 2, 5),  # a head with another number of labels
    ],
    ids=["head-missing", "head-resized"],
)
def test_head_comes_with_the_adapter(tmp: Path, base_cls: str, base_labels: int | None, labels: int) -> None:
    import transformers
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = _bert_config(**({"num_labels": base_labels} if base_labels else {}))
    getattr(transformers, base_cls)(config).save_pretrained(tmp / "base")
    adapter = _classifier_adapter(
        tmp / "base", tmp / "adapter", num_labels=labels, model_cls=BertForSequenceClassification
    )

    report = merge_adapter(tmp / "base", adapter, tmp / "merged")
    merged_config = json.loads((tmp / "merged" / "config.json").read_text())
    assert merged_config["architectures"] == ["BertForSequenceClassification"]
    assert len(merged_config["id2label"]) == labels
    assert any("labels" in n for n in report.notes)

    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    base = BertForSequenceClassification.from_pretrained(tmp / "base", num_labels=labels, ignore_mismatched_sizes=True)
    reference = PeftModel.from_pretrained(base, adapter).eval()
    merged = BertForSequenceClassification.from_pretrained(tmp / "merged").eval()
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
    assert got.shape == (2, labels)
    assert float((want - got).abs().max()) <= 1e-5
