"""Tiny random models of many architectures, each with the LoRA targets its published adapters use.

Every builder returns an untrained model of the task's own class (hidden 32, 2 layers, vocab 96-128),
built from its transformers config; nothing is downloaded. ``inputs`` gives the fixed tensors a
forward pass needs, so outputs of the base, of PeftModel(base, adapter) and of the merge compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

VOCAB = 128
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
DECODER = {
    **SMALL,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Arch:
    """One architecture: how to build it, what its adapters target, how to feed it."""

    build: Callable[[], Any]
    targets: list[str] | str
    task_type: str | None = "CAUSAL_LM"
    kind: str = "causal"  # causal | vlm | image-text | seq2seq | speech | encoder | vision | audio: inputs
    group: str = "decoder"  # the family whose bf16 case stands for it
    lora: dict[str, Any] = field(default_factory=dict)  # more LoraConfig arguments (fan_in_fan_out, ...)


def _causal(config_class: str, **extra: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        config = getattr(transformers, config_class)(**{**DECODER, **extra})
        return transformers.AutoModelForCausalLM.from_config(config)

    return build


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    )


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            **SMALL, vocab_size=VOCAB, max_position_embeddings=64, rotary_pct=0.5, bos_token_id=1, eos_token_id=2
        )
    )


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(
        OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )


def falcon():
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(
        FalconConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            new_decoder_architecture=False,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def falcon_new_architecture():  # Falcon-40B/180B: grouped key/value heads, two layer norms
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        vocab_size=VOCAB,
        new_decoder_architecture=True,
        bias=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return FalconForCausalLM(config)


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(**DECODER, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8)
    )


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def flan_t5():  # T5 v1.1 / Flan-T5 / mT5: gated feed-forward, untied output head
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(
        BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
    )


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(**SMALL, vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)
    )


def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        RobertaConfig(**SMALL, vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)
    )


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB,
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
    return WhisperForConditionalGeneration(config)


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**SMALL, image_size=16, patch_size=4, num_labels=4))


_GEMMA = {"head_dim": 8, "sliding_window": 16}
SEQ_CLS = {"modules_to_save": ["classifier"]}

ARCHS: dict[str, Arch] = {
    "llama": Arch(_causal("LlamaConfig"), LLAMA_TARGETS),
    "mistral": Arch(_causal("MistralConfig", sliding_window=16), LLAMA_TARGETS),
    "qwen2": Arch(_causal("Qwen2Config", tie_word_embeddings=True), LLAMA_TARGETS),
    "qwen3": Arch(_causal("Qwen3Config", head_dim=8, tie_word_embeddings=True), LLAMA_TARGETS),
    "gemma2": Arch(_causal("Gemma2Config", **_GEMMA), LLAMA_TARGETS),
    "gemma3-text": Arch(_causal("Gemma3TextConfig", **_GEMMA), LLAMA_TARGETS),
    "phi3": Arch(
        _causal("Phi3Config", pad_token_id=0), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], group="fused"
    ),
    "gpt2": Arch(gpt2, ["c_attn", "c_proj"], group="fused", lora={"fan_in_fan_out": True}),
    "gpt2-mlp": Arch(gpt2, ["c_attn", "c_proj", "c_fc"], group="fused", lora={"fan_in_fan_out": True}),
    "gpt-neox": Arch(gpt_neox, ["query_key_value", "dense"], group="fused"),
    "opt": Arch(opt, ["q_proj", "v_proj"]),
    "falcon": Arch(falcon, ["query_key_value"], group="fused"),
    "falcon-new-architecture": Arch(
        falcon_new_architecture, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], group="fused"
    ),
    "qwen3-moe": Arch(qwen3_moe, ["q_proj", "k_proj", "v_proj", "o_proj"], group="moe"),
    "mixtral": Arch(
        _causal("MixtralConfig", num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        group="moe",
    ),
    "t5": Arch(t5, ["q", "v"], "SEQ_2_SEQ_LM", kind="seq2seq", group="seq2seq"),
    "flan-t5": Arch(
        flan_t5, ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], "SEQ_2_SEQ_LM", kind="seq2seq", group="seq2seq"
    ),
    "bart": Arch(bart, ["q_proj", "v_proj"], "SEQ_2_SEQ_LM", kind="seq2seq", group="seq2seq"),
    "bert": Arch(bert, ["query", "value"], "SEQ_CLS", kind="encoder", group="encoder", lora=SEQ_CLS),
    "roberta": Arch(roberta, ["query", "value"], "SEQ_CLS", kind="encoder", group="encoder", lora=SEQ_CLS),
    "whisper": Arch(whisper, ["q_proj", "v_proj"], None, kind="speech", group="speech"),
    "whisper-all": Arch(
        whisper, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], None, kind="speech", group="speech"
    ),
    # transformers 5 names ViT's attention projections q_proj/v_proj (older checkpoints: query/value).
    "vit": Arch(vit, ["q_proj", "v_proj"], None, kind="vision", group="vision", lora=SEQ_CLS),
}


def inputs(kind: str, model: Any) -> dict[str, torch.Tensor]:
    """Fixed inputs for one forward pass of a model of this kind."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 96, (2, 10), generator=g)  # below every special or image token of the builders
    if kind in ("causal", "vlm", "encoder"):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    decoder_ids = torch.randint(3, 96, (2, 6), generator=g)
    if kind == "seq2seq":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": decoder_ids}
    if kind == "speech":
        mels = model.config.num_mel_bins
        frames = 2 * model.config.max_source_positions
        return {"input_features": torch.randn(2, mels, frames, generator=g), "decoder_input_ids": decoder_ids}
    if kind == "image-text":  # Gemma 3: the image's soft tokens stand where the processor would put them
        config = model.config
        ids[:, 2 : 2 + config.mm_tokens_per_image] = config.image_token_index
        size = config.vision_config.image_size
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": (ids == config.image_token_index).long(),
            "pixel_values": torch.randn(2, 3, size, size, generator=g),
        }
    if kind == "vision":
        size = model.config.image_size
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g)}
    if kind == "audio":  # raw 16 kHz samples, for wav2vec2-style encoders
        return {"input_values": torch.randn(2, 400, generator=g)}
    raise ValueError(kind)


def generation_inputs(kind: str, model: Any) -> dict[str, torch.Tensor] | None:
    """The first example of ``inputs`` without decoder ids, for generate(); None for models that do not generate."""
    if kind in ("encoder", "vision", "audio"):
        return None
    return {k: v[:1] for k, v in inputs(kind, model).items() if k != "decoder_input_ids"}
