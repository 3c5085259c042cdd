"""Function checks per task: probe inputs the model accepts, and the rows that compare the outputs.

Every forward pass goes through the transformers model itself (``PeftModel.get_base_model()`` holds
the injected adapter layers), so one input dict serves base, base + adapter and merged alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .models import FEATURE_TASKS, HEAD_TASKS, SEQ2SEQ_TASKS, LoadedModels, short_error
from .verify_report import Check

BATCH, PROMPT_TOKENS, DECODER_TOKENS, NEW_TOKENS = 2, 24, 8, 16
_SEED = 1234
_FEATURE_FIELDS = ("pooler_output", "text_embeds", "image_embeds", "last_hidden_state", "encoder_last_hidden_state")

LOGIT_ROWS = [
    "logits max abs diff vs PeftModel",
    "top-1 token agreement",
    "greedy continuation identical",
    "adapter changes the output",
]
HEAD_ROWS = ["head logits max abs diff vs PeftModel", "predicted-label agreement", "adapter changes the output"]
FEATURE_ROWS = ["features max abs diff vs PeftModel", "embedding cosine similarity", "adapter changes the output"]


class ProbeInputError(Exception):
    """The model's input cannot be made up from its config (the row says why)."""


def row_names(task: str) -> list[str]:
    if task in HEAD_TASKS:
        return HEAD_ROWS
    if task in FEATURE_TASKS:
        return FEATURE_ROWS
    return LOGIT_ROWS


@dataclass(frozen=True)
class Tolerance:
    low_precision: bool  # 16-bit merged weights: rounding them is a real (tiny) difference

    def limit(self, scale: float) -> float:
        return 2e-2 * scale if self.low_precision else 1e-3 * max(1.0, scale / 10)

    @property
    def agreement(self) -> float:
        return 0.95 if self.low_precision else 1.0


def task_checks(models: LoadedModels) -> list[Check]:
    """The rows for the models' task, from probe inputs built from the merged model's config."""
    inputs = probe_inputs(models)
    if models.task in HEAD_TASKS:
        return head_checks(models, inputs)
    if models.task in FEATURE_TASKS:
        return feature_checks(models, inputs)
    return logit_checks(models, inputs)


# --- probe inputs ------------------------------------------------------------------------------


def probe_inputs(models: LoadedModels) -> dict[str, torch.Tensor]:
    """Random inputs of the shapes the model's config asks for: tokens, images, log-mel features, audio."""
    model, gen = models.merged, torch.Generator().manual_seed(_SEED)
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    inputs: dict[str, torch.Tensor] = {}
    if main == "input_ids":
        inputs.update(_token_inputs(config, models.base_vocab or _config_vocab(config), PROMPT_TOKENS, gen))
    elif main == "pixel_values":
        inputs["pixel_values"] = _pixels(config, gen)
    elif main == "input_features":
        inputs["input_features"] = _log_mel(config, gen)
    elif main == "input_values":  # raw audio (wav2vec2, HuBERT): one second at 16 kHz
        inputs["input_values"] = torch.randn(BATCH, 16000, generator=gen)
    else:
        raise ProbeInputError(f"no probe input for a model whose input is {main}")
    if models.task in FEATURE_TASKS and main == "input_ids" and getattr(config, "vision_config", None) is not None:
        inputs["pixel_values"] = _pixels(config.vision_config, gen)  # dual encoders (CLIP) need both
    if getattr(config, "is_encoder_decoder", False) and models.task not in SEQ2SEQ_TASKS:
        _end_with_eos(inputs, config)  # BartForSequenceClassification: decoder inputs from input_ids, eos pooled
    elif getattr(config, "is_encoder_decoder", False):
        vocab = models.base_vocab or _config_vocab(config)
        start = torch.full((BATCH, 1), _decoder_start(config, vocab), dtype=torch.long)
        rest = _token_inputs(config, vocab, DECODER_TOKENS - 1, gen)["input_ids"]
        inputs["decoder_input_ids"] = torch.cat([start, rest], dim=1)
    return {k: v.to(models.device) for k, v in inputs.items()}


def _token_inputs(config: Any, vocab: int, length: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if not vocab:
        raise ProbeInputError("the model has no token vocabulary to draw a prompt from")
    ids = torch.randint(0, vocab, (BATCH, length), generator=gen)
    # Image/audio placeholder tokens make a VLM expect pixels: keep every special id out of the prompt.
    special = _special_ids(config)
    allowed = next((i for i in range(vocab) if i not in special), 0)
    for token in special:
        ids[ids == token] = allowed
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _end_with_eos(inputs: dict[str, torch.Tensor], config: Any) -> None:
    """An encoder-decoder classifier reads the decoder's state at the last eos of each sequence, and needs one."""
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and "input_ids" in inputs:
        inputs["input_ids"][:, -1] = eos


def _special_ids(config: Any) -> set[int]:
    found: set[int] = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for key, value in vars(cfg).items() if cfg is not None else ():
            if key.endswith(("token_id", "token_index", "token_ids")):
                values = value if isinstance(value, (list, tuple)) else [value]
                found.update(v for v in values if isinstance(v, int))
    return found


def _pixels(config: Any, gen: torch.Generator) -> torch.Tensor:
    # A dual encoder's image classifier (CLIPForImageClassification) keeps the image settings in vision_config.
    config = config if getattr(config, "image_size", None) is not None else getattr(config, "vision_config", config)
    size = getattr(config, "image_size", None)
    if size is None:
        raise ProbeInputError("the config gives no image_size to build pixel_values")
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = int(getattr(config, "num_channels", 3))
    return torch.randn(BATCH, channels, int(height), int(width), generator=gen)


def _log_mel(config: Any, gen: torch.Generator) -> torch.Tensor:
    mels, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not mels or not positions:
        raise ProbeInputError("the config gives no num_mel_bins/max_source_positions to build log-mel features")
    # Whisper's two encoder convolutions halve the frames: the encoder wants exactly 2 x max_source_positions.
    return torch.randn(BATCH, int(mels), 2 * int(positions), generator=gen)


def _config_vocab(config: Any) -> int:
    return int(getattr(getattr(config, "text_config", None) or config, "vocab_size", 0) or 0)


def _decoder_start(config: Any, vocab: int) -> int:
    start = getattr(config, "decoder_start_token_id", None)
    return start if isinstance(start, int) and 0 <= start < vocab else 0


# --- rows ------------------------------------------------------------------------------------------


@torch.no_grad()
def three_ways(models: LoadedModels, inputs: dict[str, torch.Tensor]) -> tuple[Any, Any, Any]:
    """Outputs of base + adapter, merged and base alone, for one input dict."""
    adapted = models.peft.get_base_model()
    ref = adapted(**inputs)
    got = models.merged(**inputs)
    with models.peft.disable_adapter():
        base = adapted(**inputs)
    return ref, got, base


def _detail(models: LoadedModels, text: str) -> str:
    """The first row's detail: what was compared, which class and why, and what both models share."""
    why = f" from {models.chosen_because}" if models.chosen_because else ""
    return "; ".join([f"{models.task} as {models.model_class}{why}, {text}", *models.notes])


@dataclass(frozen=True)
class Compared:
    """The three outputs of one task reduced to what its first and last rows read."""

    tol: Tolerance
    diff: float  # max |base + adapter - merged|
    scale: float  # max |base + adapter|, the yardstick of the tolerance
    effect: float  # max |base - (base + adapter)|: the adapter must change something

    @classmethod
    def of(cls, models: LoadedModels, ref: torch.Tensor, got: torch.Tensor, base: torch.Tensor) -> Compared:
        tol = Tolerance(models.merged_dtype in (torch.float16, torch.bfloat16))
        diff, scale = float((ref - got).abs().max()), float(ref.abs().max()) or 1.0
        return cls(tol, diff, scale, float((base - ref).abs().max()))

    def diff_check(self, row: str, models: LoadedModels, text: str) -> Check:
        limit = self.tol.limit(self.scale)
        return Check(row, "function", self.diff <= limit, f"{self.diff:.3e}", f"<= {limit:.3e}", _detail(models, text))

    def effect_check(self, row: str, what: str) -> Check:
        detail = f"max |{what}(base) - {what}(base+adapter)|"
        return Check(row, "function", self.effect > 0, f"{self.effect:.3e}", "> 0", detail)


def logit_checks(models: LoadedModels, inputs: dict[str, torch.Tensor]) -> list[Check]:
    """Causal LM, VLM (text only) and seq2seq: logits, top-1 tokens, greedy decoding, adapter effect."""
    ref, got, base = (out.logits.float() for out in three_ways(models, inputs))
    compared = Compared.of(models, ref, got, base)
    tol = compared.tol
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    shape = " x ".join(str(n) for n in next(iter(inputs.values())).shape)
    return [
        compared.diff_check(LOGIT_ROWS[0], models, f"random input {shape}, logits up to {compared.scale:.2f}"),
        Check(LOGIT_ROWS[1], "function", top1 >= tol.agreement, f"{top1:.2%}", f">= {tol.agreement:.0%}"),
        _greedy_row(models, inputs, tol),
        compared.effect_check(LOGIT_ROWS[3], "logits"),
    ]


@torch.no_grad()
def _greedy_row(models: LoadedModels, inputs: dict[str, torch.Tensor], tol: Tolerance) -> Check:
    first = {k: v[:1] for k, v in inputs.items()}
    try:
        if models.task in SEQ2SEQ_TASKS:
            a, b = (_greedy_seq2seq(m, first) for m in (models.peft.get_base_model(), models.merged))
        else:
            a, b = (
                _greedy_causal(m, first, models.pad_token_id) for m in (models.peft.get_base_model(), models.merged)
            )
    except Exception as exc:  # noqa: BLE001 - a model that cannot generate still has its logit rows
        return Check(LOGIT_ROWS[2], "function", None, "-", "-", f"skipped: generation failed ({short_error(exc)})")
    same = int((a[: len(b)] == b[: len(a)]).sum())
    ok = same == len(a) == len(b) or (tol.low_precision and same >= 0.75 * len(a))
    return Check(
        LOGIT_ROWS[2],
        "function",
        ok,
        f"{same}/{len(a)} tokens",
        "all" if not tol.low_precision else ">= 75% (16-bit weights)",
    )


def _greedy_causal(model: Any, inputs: dict[str, torch.Tensor], pad: int) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return out[0, inputs["input_ids"].shape[1] :]


def _greedy_seq2seq(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Greedy decoding by hand: no generation config (Whisper's wants language tables) gets in the way."""
    encoder_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    decoded = inputs["decoder_input_ids"][:, :1]
    for _ in range(NEW_TOKENS):
        logits = model(**encoder_inputs, decoder_input_ids=decoded).logits[:, -1]
        decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
    return decoded[0, 1:]


def _head_logits(out: Any) -> torch.Tensor:
    if getattr(out, "logits", None) is not None:
        return out.logits.float()
    return torch.stack([out.start_logits, out.end_logits], dim=-1).float()  # question answering


def _head_outputs(models: LoadedModels, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The three head logits; one sample at a time where the classifier cannot batch.

    A decoder's sequence classifier (LlamaForSequenceClassification) finds each sequence's last token through
    config.pad_token_id and refuses batches without one; training set it from the tokenizer, the adapter does
    not keep it. The probe has no padding, so sample by sample is what a batch would compute.
    """
    if models.task != "SEQ_CLS" or getattr(models.merged.config, "pad_token_id", None) is not None:
        return tuple(_head_logits(out) for out in three_ways(models, inputs))
    rows = [three_ways(models, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(BATCH)]
    return tuple(torch.cat([_head_logits(row[j]) for row in rows]) for j in range(3))


def _label_agreement(models: LoadedModels, ref: torch.Tensor, got: torch.Tensor) -> tuple[float, str]:
    """Share of predictions that agree, as transformers' loss reads the head: argmax over the labels (over the
    positions for an answer span); each logit's sign for multi-label heads and one-output heads, whose argmax
    would always agree (num_labels=1 is a regression or a binary score)."""
    problem = getattr(models.merged.config, "problem_type", None)
    if models.task != "QUESTION_ANS" and (ref.shape[-1] == 1 or problem == "multi_label_classification"):
        return float(((ref > 0) == (got > 0)).float().mean()), f"sign of each of the {ref.shape[-1]} outputs"
    dim = -2 if models.task == "QUESTION_ANS" else -1
    over = ref.shape[-1] if models.task != "QUESTION_ANS" else "positions"
    return float((ref.argmax(dim) == got.argmax(dim)).float().mean()), f"argmax over {over}"


def head_checks(models: LoadedModels, inputs: dict[str, torch.Tensor]) -> list[Check]:
    """Classification heads (sequence, token, image, audio, QA, masked LM): logits and predicted labels."""
    ref, got, base = _head_outputs(models, inputs)
    compared = Compared.of(models, ref, got, base)
    tol = compared.tol
    agree, how = _label_agreement(models, ref, got)
    return [
        compared.diff_check(
            HEAD_ROWS[0], models, f"{BATCH} random inputs, logits {list(ref.shape)} up to {compared.scale:.2f}"
        ),
        Check(
            HEAD_ROWS[1],
            "function",
            agree >= tol.agreement,
            f"{agree:.2%}",
            f">= {tol.agreement:.0%}",
            how,
        ),
        compared.effect_check(HEAD_ROWS[2], "logits"),
    ]


def _features(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every feature tensor flattened per sample, and the embedding (pooled, or the token mean)."""
    present = [getattr(out, name).float() for name in _FEATURE_FIELDS if getattr(out, name, None) is not None]
    if not present:
        raise ProbeInputError("the model returned no hidden state or embedding")
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in present], dim=1)
    pooled = present[0] if present[0].dim() == 2 else present[0].mean(dim=1)
    return flat, pooled


def feature_checks(models: LoadedModels, inputs: dict[str, torch.Tensor]) -> list[Check]:
    """Feature extraction: hidden states / embeddings, their max difference and cosine similarity."""
    (ref, ref_emb), (got, got_emb), (base, _) = (_features(out) for out in three_ways(models, inputs))
    compared = Compared.of(models, ref, got, base)
    cosine = float(torch.nn.functional.cosine_similarity(ref_emb, got_emb, dim=-1).min())
    cos_needed = 0.999 if compared.tol.low_precision else 0.99999
    return [
        compared.diff_check(FEATURE_ROWS[0], models, f"{BATCH} random inputs, values up to {compared.scale:.2f}"),
        Check(
            FEATURE_ROWS[1],
            "function",
            cosine >= cos_needed,
            f"{cosine:.6f}",
            f">= {cos_needed}",
            "worst sample, pooled embedding",
        ),
        compared.effect_check(FEATURE_ROWS[2], "features"),
    ]


__all__ = ["FEATURE_ROWS", "HEAD_ROWS", "LOGIT_ROWS", "ProbeInputError", "probe_inputs", "row_names", "task_checks"]
