"""The model card of a merged model: metadata the Hub understands, and the proof of the merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .quant_targets import QUANT_TARGETS, QuantSummary
from .report import MergeReport
from .speed import SpeedComparison, Timing
from .verify import VerificationReport

TAGS = ["merge", "lora", "peft", "merged-lora", "lora-merge-space"]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def build_model_card(
    report: MergeReport,
    verification: VerificationReport | None,
    *,
    repo_id: str | None,
    base_id: str,
    base_revision: str | None,
    adapter_id: str,
    adapter_revision: str | None,
    base_card: dict[str, Any] | None = None,
    gguf_types: list[str] | None = None,
    quant: QuantSummary | None = None,
    speed: SpeedComparison | None = None,
):
    """A huggingface_hub.ModelCard; the caller saves it as README.md beside the weights."""
    from huggingface_hub import ModelCard, ModelCardData

    base_card = base_card or {}
    data = ModelCardData(
        # The Hub only understands repo IDs here; a local path would be a broken link.
        base_model=base_id if _is_hub_id(base_id) else None,
        library_name="transformers",
        license=base_card.get("license"),
        pipeline_tag=base_card.get("pipeline_tag") or "text-generation",
        tags=list(dict.fromkeys([*TAGS, *(["gguf"] if gguf_types else [])])),
        base_model_relation="finetune",
    )
    recipe_rows = _recipe_rows(
        report, base_id=base_id, base_revision=base_revision, adapter_id=adapter_id, adapter_revision=adapter_revision
    ) + _quant_rows(quant)
    title = repo_id.split("/")[-1] if repo_id else Path(report.output_dir).name
    parts = [
        f"# {title}",
        "",
        f"This model is [`{base_id}`]({_hub_link(base_id)}) with the LoRA adapter "
        f"[`{adapter_id}`]({_hub_link(adapter_id)})"
        + (f" (revision `{adapter_revision}`)" if adapter_revision else "")
        + " merged into its weights: W' = W + scale · B @ A, the math of PEFT's `merge_and_unload`. "
        "It loads with plain transformers; no PEFT needed.",
        "",
        "## Merge recipe",
        "",
        _table(["", ""], recipe_rows),
    ]
    if report.notes or report.warnings:
        parts += ["", *[f"- {n}" for n in report.notes], *[f"- ⚠️ {w}" for w in report.warnings]]
    parts += _verification_section(verification)
    if speed is not None:
        parts += ["", speed_markdown(speed, heading="##")]
    parts += _usage(repo_id or "path/to/this/model")
    parts += _gguf_usage(repo_id or "OWNER/REPO", gguf_types or [])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts) + "\n")


def _verification_section(verification: VerificationReport | None) -> list[str]:
    if verification is None:
        return []
    verdict = "all checks passed" if verification.passed else f"{len(verification.failed())} check(s) FAILED"
    rows = [r[:5] for r in verification.rows()]
    return [
        "",
        "## Verification",
        "",
        f"Measured on the merged files ({verdict}):",
        "",
        _table(["group", "check", "value", "threshold", "result"], rows),
    ]


def usage_snippets(repo_id: str) -> list[str]:
    """Copy-ready Markdown for running ``repo_id``: transformers, vLLM and TGI (the GGUF route is separate)."""
    return [
        "transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'generate = pipeline("text-generation", model="{repo_id}")',
        "```",
        "",
        "vLLM (OpenAI-compatible server):",
        "",
        "```sh",
        f"vllm serve {repo_id}",
        "```",
        "",
        "Text Generation Inference:",
        "",
        "```sh",
        "docker run --gpus all --shm-size 1g -p 8080:80 -v $PWD/data:/data \\",
        f"    ghcr.io/huggingface/text-generation-inference:latest --model-id {repo_id}",
        "```",
    ]


def gguf_snippets(repo_id: str, types: list[str]) -> list[str]:
    """llama.cpp and Ollama lines for the GGUF files pushed beside the weights; none without any."""
    if not types:
        return []
    from .gguf_outputs import gguf_usage

    return ["llama.cpp / Ollama (GGUF):", "", "```sh", *gguf_usage(repo_id, types), "```"]


def _usage(load_id: str) -> list[str]:
    footer = "Merged with [LoRA Merge Space](https://huggingface.co/spaces) (`merge_core`)."
    return ["", "## Use", "", *usage_snippets(load_id), "", footer]


def _gguf_usage(repo_id: str, types: list[str]) -> list[str]:
    """How llama.cpp, Ollama and LM Studio run the GGUF files that sit beside the weights."""
    if not types:
        return []
    from .gguf_outputs import gguf_usage

    return [
        "",
        "## GGUF (llama.cpp, Ollama, LM Studio)",
        "",
        f"This repo also holds GGUF files: {', '.join(f'`{t}`' for t in types)}.",
        "",
        "```sh",
        *gguf_usage(repo_id, types),
        "```",
        "",
        f"LM Studio: search {repo_id}",
    ]


def _recipe_rows(
    report: MergeReport, *, base_id: str, base_revision: str | None, adapter_id: str, adapter_revision: str | None
) -> list[list[Any]]:
    """The "Merge recipe" table: the inputs, how several adapters were combined, and what the merge did."""
    scales = sorted({(m.rank, m.alpha, round(m.scale, 6)) for m in report.modules if m.kind != "replaced"})
    rows = [
        ["adapter", f"`{adapter_id}`" + (f" @ `{adapter_revision}`" if adapter_revision else "")],
        ["base model", f"`{base_id}`" + (f" @ `{base_revision}`" if base_revision else "")],
        ["merged modules", f"{len(report.modules)} ({', '.join(report.variants)})"],
        [
            "rank / alpha / scale",
            "; ".join(f"r={r}, alpha={a:g}, scale={s:g}" for r, a, s in scales[:6])
            + (" ..." if len(scales) > 6 else ""),
        ],
        [
            "output dtype",
            f"{report.output_dtype} (from {report.base_dtype}; computed in {report.compute_dtype}, rounded once)",
        ],
        ["tensors changed / copied bit-identically", f"{len(report.changed_tensors)} / {report.copied_tensors}"],
        ["size", f"{report.output_bytes / 1e9:.3f} GB in {len(report.shards)} shard(s)"],
    ]
    rows[1:1] = _combination_rows(report.recipe)
    return rows


def _quant_rows(quant: QuantSummary | None) -> list[list[Any]]:
    """Rows for a quantized base: which one, the target chosen, and what that measurably cost."""
    if quant is None or not quant.quantized_base:
        return []
    rows = [
        ["quantized base", f"`{quant.quantized_base}` ({quant.method})"],
        ["target", f"{quant.target}: {QUANT_TARGETS.get(quant.target, '')}"],
    ]
    if quant.target != "dequantized":
        rows.append(["measured cost", quant.cost or "not measured"])
    return rows


def _combination_rows(recipe: dict[str, Any]) -> list[list[Any]]:
    """Rows for how several adapters were combined into the merged one (merge_recipe.json); none for one adapter."""
    if not recipe:
        return []

    def number(value: Any) -> str:
        return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    ctype = recipe.get("combination_type", "?")
    effective = recipe.get("effective_combination_type")
    rows = [
        [
            "combination",
            f"`{ctype}`"
            + (f" (run as `{effective}`)" if effective else "")
            + (f": {recipe['semantics']}" if recipe.get("semantics") else ""),
        ]
    ]
    rows += [
        [f"source {i}", f"`{source.get('name', '?')}` × {number(source.get('weight', '?'))}"]
        for i, source in enumerate(recipe.get("sources") or [], start=1)
    ]
    parameters = recipe.get("parameters") or {}
    if parameters:
        rows.append(["combination parameters", ", ".join(f"{k}={number(v)}" for k, v in parameters.items())])
    return rows


def speed_markdown(speed: SpeedComparison, heading: str = "####") -> str:
    """The comparison as a Markdown table in the seed's terms, with the honest verdict under it."""
    s, m = speed.separate, speed.merged
    rows = [
        ("generation, tokens/s", Timing.spread(s.tokens_per_s), Timing.spread(m.tokens_per_s)),
        ("first-token latency, s", Timing.spread(s.first_token_s), Timing.spread(m.first_token_s)),
        ("load time, s", f"{s.load_s:.3g}", f"{m.load_s:.3g}"),
        ("size on disk, MB", f"{speed.separate_bytes / 1e6:,.1f}", f"{speed.merged_bytes / 1e6:,.1f}"),
        ("needs PEFT at inference", "yes", "no"),
    ]
    lines = ["| | base + adapter (PEFT, unmerged) | merged |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    note = (
        f"Median (min–max) of {speed.runs} runs after a warm-up, {speed.new_tokens} new tokens, greedy, "
        f"on {speed.device}: **{speed.verdict()}**."
    )
    return "\n".join([f"{heading} Merged vs separate, measured", "", *lines, "", note])


def _is_hub_id(text: str) -> bool:
    from .hub import is_repo_id

    return is_repo_id(text) and not Path(text).exists()


def _hub_link(repo_id: str) -> str:
    if repo_id.startswith(("/", ".")):
        return repo_id
    return f"https://huggingface.co/{repo_id}"


def read_local_card_data(folder: Path) -> dict[str, Any]:
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.to_dict()
    except Exception:  # noqa: BLE001 - a broken base card must not stop a merge
        return {}
