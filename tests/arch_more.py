"""More architectures, each a tiny model from its config alone, with the targets its published adapters use.

These have nothing special to build, so one line each: the config class, the task's model class, the
config's arguments at test size. The families of tests/arch_models.py stay there with their reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.arch_models import DECODER, LLAMA_TARGETS, SMALL, VOCAB, Arch


def _model(config_class: str, model_class: str, **config: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


ENCODER = {**SMALL, "vocab_size": VOCAB, "max_position_embeddings": 64, "num_labels": 3}
SEQ2SEQ = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "max_position_embeddings": 64,
}
MOE = {"moe_intermediate_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1}
MLA = {"kv_lora_rank": 8, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8}
WAV2VEC2 = {
    "conv_dim": (16, 16),
    "conv_kernel": (10, 3),
    "conv_stride": (5, 2),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "classifier_proj_size": 16,
    "num_labels": 3,
}


def _cls(*heads: str) -> dict[str, Any]:
    return {"modules_to_save": list(heads)}


MORE_ARCHS: dict[str, Arch] = {
    "distilbert": Arch(
        _model(
            "DistilBertConfig",
            "DistilBertForSequenceClassification",
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=48,
            max_position_embeddings=64,
            num_labels=3,
        ),
        ["q_lin", "v_lin"],
        "SEQ_CLS",
        kind="encoder",
        group="encoder",
        lora=_cls("pre_classifier", "classifier"),
    ),
    "deberta-v2": Arch(
        _model("DebertaV2Config", "DebertaV2ForSequenceClassification", **ENCODER),
        ["query_proj", "value_proj"],
        "SEQ_CLS",
        kind="encoder",
        group="encoder",
        lora=_cls("pooler", "classifier"),
    ),
    # ALBERT shares one layer's weights across all layers: one tensor, changed once.
    "albert": Arch(
        _model("AlbertConfig", "AlbertForSequenceClassification", **ENCODER, embedding_size=16),
        ["query", "value"],
        "SEQ_CLS",
        kind="encoder",
        group="encoder",
        lora=_cls("classifier"),
    ),
    "modernbert": Arch(
        _model(
            "ModernBertConfig",
            "ModernBertForSequenceClassification",
            **ENCODER,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        ["Wqkv", "Wo"],
        "SEQ_CLS",
        kind="encoder",
        group="encoder",
        lora=_cls("classifier"),
    ),
    "gpt-j": Arch(
        _model(
            "GPTJConfig",
            "GPTJForCausalLM",
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        ["q_proj", "v_proj"],
    ),
    "bloom": Arch(
        _model(
            "BloomConfig",
            "BloomForCausalLM",
            vocab_size=VOCAB,
            hidden_size=32,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
        ["query_key_value"],
        group="fused",
    ),
    # StarCoder's c_attn is an nn.Linear, not GPT-2's transposed Conv1D.
    "gpt-bigcode": Arch(
        _model(
            "GPTBigCodeConfig",
            "GPTBigCodeForCausalLM",
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        ["c_attn", "c_proj", "c_fc"],
        group="fused",
    ),
    "starcoder2": Arch(
        _model("Starcoder2Config", "Starcoder2ForCausalLM", **DECODER),
        ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    ),
    "phi-2": Arch(
        _model("PhiConfig", "PhiForCausalLM", **DECODER), ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    ),
    "stablelm": Arch(_model("StableLmConfig", "StableLmForCausalLM", **DECODER), LLAMA_TARGETS),
    "cohere": Arch(_model("CohereConfig", "CohereForCausalLM", **DECODER), LLAMA_TARGETS),
    "olmo2": Arch(_model("Olmo2Config", "Olmo2ForCausalLM", **DECODER), LLAMA_TARGETS),
    "granite": Arch(_model("GraniteConfig", "GraniteForCausalLM", **DECODER), LLAMA_TARGETS),
    "glm4": Arch(
        _model("Glm4Config", "Glm4ForCausalLM", **DECODER, head_dim=8),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
        group="fused",
    ),
    "mpt": Arch(
        _model("MptConfig", "MptForCausalLM", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
        ["Wqkv", "out_proj"],
        group="fused",
    ),
    # DeepSeek-V3's multi-head latent attention: low-rank q and kv projections, first layer dense, then MoE.
    "deepseek-v3": Arch(
        _model("DeepseekV3Config", "DeepseekV3ForCausalLM", **DECODER, **MOE, **MLA, first_k_dense_replace=1),
        ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
        group="moe",
    ),
    "olmoe": Arch(
        _model("OlmoeConfig", "OlmoeForCausalLM", **DECODER, num_experts=4, num_experts_per_tok=2),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        group="moe",
    ),
    "mamba": Arch(
        _model(
            "MambaConfig",
            "MambaForCausalLM",
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            state_size=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        ["in_proj", "x_proj", "dt_proj"],
        group="ssm",
    ),
    "marian": Arch(
        _model("MarianConfig", "MarianMTModel", **SEQ2SEQ, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0),
        ["q_proj", "v_proj"],
        "SEQ_2_SEQ_LM",
        kind="seq2seq",
        group="seq2seq",
    ),
    # NLLB's architecture.
    "m2m100": Arch(
        _model(
            "M2M100Config",
            "M2M100ForConditionalGeneration",
            **SEQ2SEQ,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "SEQ_2_SEQ_LM",
        kind="seq2seq",
        group="seq2seq",
    ),
    "mt5": Arch(
        _model(
            "MT5Config",
            "MT5ForConditionalGeneration",
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
        ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        "SEQ_2_SEQ_LM",
        kind="seq2seq",
        group="seq2seq",
    ),
    "hubert": Arch(
        _model("HubertConfig", "HubertForSequenceClassification", **SMALL, **WAV2VEC2),
        ["q_proj", "v_proj"],
        None,
        kind="audio",
        group="audio",
        lora=_cls("classifier", "projector"),
    ),
    "swin": Arch(
        _model(
            "SwinConfig",
            "SwinForImageClassification",
            image_size=16,
            patch_size=2,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=2,
            num_labels=4,
        ),
        ["q_proj", "v_proj"],
        None,
        kind="vision",
        group="vision",
        lora=_cls("classifier"),
    ),
    "clip-vision": Arch(
        _model("CLIPVisionConfig", "CLIPVisionModel", **SMALL, image_size=16, patch_size=4),
        ["q_proj", "v_proj"],
        None,
        kind="vision",
        group="vision",
    ),
}
