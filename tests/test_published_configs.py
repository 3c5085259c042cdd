"""adapter_config.json variants as published adapters carry them, each merged and compared with PeftModel(base,
adapter) unmerged: options whose PEFT semantics the merge once got wrong or refused without cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_core import MergeOptions, merge_adapter
from merge_core.errors import UnsupportedAdapterError
from tests.arch_models import bart, t5
from tests.factories import load_model, logits, make_adapter, make_base, peft_reference, prompt_ids


def _merged_logits(base: Path, adapter: Path, out: Path) -> torch.Tensor:
    merge_adapter(base, adapter, out, MergeOptions(dtype="float32"))
    return logits(load_model(out), prompt_ids())


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_ensure_weight_tying_lora_on_a_tied_embedding_changes_both_sides(tmp: Path, use_dora: bool) -> None:
    # PEFT wraps the tied lm_head with the embedding's own LoRA (transposed) and saves both factor pairs; unmerged,
    # embedding and head both compute with W + delta (PEFT 0.21's merge_and_unload adds delta twice). With DoRA each
    # side has a magnitude of its own, so the merged head is a tensor of its own.
    base = make_base(tmp / "base", "qwen2", tie=True)
    adapter = make_adapter(
        base,
        tmp / "adapter",
        target_modules=["q_proj", "embed_tokens"],
        ensure_weight_tying=True,
        use_dora=use_dora,
        magnitude_noise=0.2,
    )
    reference = peft_reference(base, adapter)
    want = logits(reference, prompt_ids())
    with reference.disable_adapter():
        plain = logits(reference, prompt_ids())
    got = _merged_logits(base, adapter, tmp / "merged")
    assert float((want - plain).abs().max()) > 1.0, "the tied head's delta must show in the logits"
    assert float((want - got).abs().max()) <= 2e-4  # logits of a few hundred, compared in float32
    assert json.loads((tmp / "merged" / "config.json").read_text())["tie_word_embeddings"] is not use_dora


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        # PEFT stacks copies of base layers that share their weights; its merge adds every copy's delta to them.
        ({"layer_replication": [[0, 2], [1, 2]]}, "uses layer replication"),
        ({"trainable_token_indices": [2, 5], "use_dora": True}, "combines DoRA with trainable_token_indices"),
    ],
    ids=["layer-replication", "dora-with-trainable-tokens"],
)
def test_options_no_module_can_merge_are_refused_by_the_config(tmp: Path, options: dict, reason: str) -> None:
    base = make_base(tmp / "base")
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj"], **options)
    with pytest.raises(UnsupportedAdapterError) as refusal:
        merge_adapter(base, adapter, tmp / "merged", MergeOptions(dtype="float32"))
    assert refusal.value.args[0].startswith(f"adapter_config.json: this LORA adapter {reason}")
    assert not (tmp / "merged").exists()


def _seq2seq_adapter(folder: Path, build, **lora: object) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build()
    model.save_pretrained(folder / "base")
    config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, init_lora_weights=False, **lora)
    get_peft_model(model, config).save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


@pytest.mark.parametrize(
    ("build", "lora", "changed"),
    [
        # PEFT wraps T5's `shared`, which the forward never calls: base + adapter computes as the base, while the
        # merge used to change the matrix the encoder, decoder and head read.
        (t5, {"target_modules": ["q", "shared"]}, "shared"),
        (bart, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "lm_head"),
        (bart, {"target_modules": ["q_proj", "embed_tokens"]}, "model.decoder.embed_tokens"),
    ],
    ids=["t5-lora-on-shared", "bart-saved-head", "bart-lora-on-embed-tokens"],
)
def test_a_change_to_one_user_of_a_shared_encoder_decoder_embedding_is_refused(
    tmp: Path, build, lora: dict, changed: str
) -> None:
    base, adapter = _seq2seq_adapter(tmp, build, **lora)
    with pytest.raises(UnsupportedAdapterError) as refusal:
        merge_adapter(base, adapter, tmp / "merged", MergeOptions(dtype="float32"))
    message = refusal.value.args[0]
    assert message.startswith(f"The adapter changes {changed}, one of the modules that share one embedding matrix")
    assert message.endswith("use the adapter with PEFT on top of the base model.")
    assert not (tmp / "merged").exists()


def test_seq2seq_adapters_on_attention_alone_still_merge(tmp: Path) -> None:
    from peft import PeftModel
    from transformers import BartForConditionalGeneration

    base, adapter = _seq2seq_adapter(tmp, bart, target_modules=["q_proj", "v_proj", "fc1"])
    merge_adapter(base, adapter, tmp / "merged", MergeOptions(dtype="float32"))
    ids = prompt_ids(vocab=128)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(BartForConditionalGeneration.from_pretrained(base), adapter).eval()
        want = reference(input_ids=ids, decoder_input_ids=ids).logits
        merged = BartForConditionalGeneration.from_pretrained(tmp / "merged").eval()
        got = merged(input_ids=ids, decoder_input_ids=ids).logits
    assert float((want - got).abs().max()) <= 1e-4


@pytest.mark.parametrize("peft_type", ["LORA", "IA3"])
def test_fan_in_fan_out_true_on_linear_layers_is_ignored_as_peft_ignores_it(tmp: Path, peft_type: str) -> None:
    # PEFT resets fan_in_fan_out to the layer's type (true only on Conv1D); a config written by another tool or by
    # hand may still say true for Llama's nn.Linear, whose square q_proj would then take the delta transposed.
    from peft import IA3Config, get_peft_model

    base = make_base(tmp / "base")
    if peft_type == "LORA":
        adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj", "v_proj"])
    else:
        model = get_peft_model(
            load_model(base), IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
        adapter = tmp / "adapter"
        model.save_pretrained(adapter)
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "fan_in_fan_out": True}))
    reference = peft_reference(base, adapter)
    want = logits(reference, prompt_ids())
    with reference.disable_adapter():
        plain = logits(reference, prompt_ids())
    got = _merged_logits(base, adapter, tmp / "merged")
    assert float((want - plain).abs().max()) > 1e-3, "the adapter must change the output"
    assert float((want - got).abs().max()) <= 1e-4


def _store_embedding_copies(base: Path) -> None:
    """The layout of BART checkpoints saved by transformers 4: encoder and decoder embeddings stored as tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(base / "model.safetensors")
    for side in ("encoder", "decoder"):
        tensors[f"model.{side}.embed_tokens.weight"] = tensors["model.shared.weight"].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})


def test_bart_with_stored_embeddings_merges_a_saved_head_and_refuses_lora_on_shared(tmp: Path) -> None:
    from peft import PeftModel
    from transformers import BartForConditionalGeneration

    base, adapter = _seq2seq_adapter(tmp / "head", bart, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _store_embedding_copies(base)
    merge_adapter(base, adapter, tmp / "merged", MergeOptions(dtype="float32"))
    ids = prompt_ids(vocab=128)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(BartForConditionalGeneration.from_pretrained(base), adapter).eval()
        want = reference(input_ids=ids, decoder_input_ids=ids).logits
        got = BartForConditionalGeneration.from_pretrained(tmp / "merged")(input_ids=ids, decoder_input_ids=ids).logits
    assert float((want - got).abs().max()) <= 1e-4

    base, adapter = _seq2seq_adapter(tmp / "shared", bart, target_modules=["q_proj", "shared"])
    _store_embedding_copies(base)
    with pytest.raises(UnsupportedAdapterError, match="^The adapter changes model.shared, one of the modules"):
        merge_adapter(base, adapter, tmp / "shared-merged", MergeOptions(dtype="float32"))


def test_trainable_tokens_of_their_own_on_a_tied_head_untie_it(tmp: Path) -> None:
    # Other indices for lm_head than for the embedding: PEFT does not tie the two token adapters, and saves both.
    base = make_base(tmp / "base", "qwen2", tie=True)
    indices = {"embed_tokens": [1, 2], "lm_head": [3, 4]}
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj"], trainable_token_indices=indices)
    want = logits(peft_reference(base, adapter), prompt_ids())
    got = _merged_logits(base, adapter, tmp / "merged")
    assert float((want - got).abs().max()) <= 1e-4
    assert json.loads((tmp / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
