"""The page's layout: one function per section, each filling ``ui`` with its components by field name.

No handlers here (app.py wires them): a section only says what the user sees, with the elem_ids the
browser tests use.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from merge_core import pipeline
from merge_core.pipeline import FUNCTIONAL, VerificationReport

# On a phone the verification table keeps readable columns and scrolls sideways inside its own frame
# (gradio sizes the columns from the frame's width, so the frame is what gets a minimum width).
PAGE_CSS = """
@media (max-width: 640px) {
  #verify-table .table-container { overflow-x: auto; }
  #verify-table .table-wrap { min-width: 680px; width: 680px; }
}
"""


def form_section(ui: dict[str, Any], *, show_login: bool, has_demo: bool) -> None:
    with gr.Row():
        if show_login:
            gr.LoginButton()
        ui["token"] = gr.Textbox(
            label="or paste a write token",
            type="password",
            placeholder="hf_…",
            elem_id="token-box",
            scale=2,
            info="Used for this request only: never stored, logged or shown.",
        )
    with gr.Row():
        ui["adapter"] = gr.Textbox(label="Adapter", placeholder="owner/lora-adapter (Hub ID)", elem_id="adapter-id")
        ui["base"] = gr.Textbox(
            label="Base model (optional)",
            placeholder="empty: the adapter's base (base_model_name_or_path)",
            elem_id="base-id",
        )
        ui["dtype"] = gr.Dropdown(pipeline.DTYPES, value="auto", label="Output dtype", elem_id="dtype")
    # Filled when the adapter's repo or folder keeps several adapters in subfolders (app.py lists them).
    ui["adapter_choice"] = gr.Dropdown(
        [], label="This repo holds several adapters: pick one", visible=False, elem_id="adapter-choice"
    )
    with gr.Accordion("Advanced", open=False), gr.Row():
        ui["adapter_revision"] = gr.Textbox(
            label="Adapter revision", placeholder="main (branch, tag or commit)", elem_id="adapter-revision"
        )
        ui["base_revision"] = gr.Textbox(
            label="Base revision", placeholder="main (branch, tag or commit)", elem_id="base-revision"
        )
        ui["max_shard_size"] = gr.Textbox(label="Max shard size", value="5GB", elem_id="shard-size")
        ui["functional"] = gr.Dropdown(
            list(FUNCTIONAL),
            value=next(iter(FUNCTIONAL)),
            label="Logits check vs PeftModel",
            elem_id="functional",
        )
        ui["combination"] = gr.Dropdown(
            list(pipeline.COMBINATION_TYPES),
            value="stack",
            elem_id="combination",
            label="Several adapters (a/x, b/y:0.5): combine as",
            info="stack = sum of weighted deltas; others: PEFT add_weighted_adapter",
        )
        ui["density"] = gr.Number(value=None, label="density (ties/dare/magnitude_prune)", elem_id="density")
        ui["gguf_types"] = gr.Dropdown(list(pipeline.GGUF_TYPES), value=[], multiselect=True, elem_id="gguf-types",
                                       label="GGUF files too", info=pipeline.GGUF_INFO)  # fmt: skip
        ui["quantized_target"] = gr.Radio(list(pipeline.QUANT_TARGETS), value="dequantized", elem_id="quantized-target",
                                          label="Quantized base", info=pipeline.QUANT_INFO)  # fmt: skip
    if has_demo:
        gr.Examples(
            [["demo/adapter", "demo/base"]],
            inputs=[ui["adapter"], ui["base"]],
            label="Bundled offline demo (tiny Llama + LoRA)",
        )


def generation_section(ui: dict[str, Any], prompts: list[str]) -> None:
    with gr.Accordion("Sample generation", open=True):
        ui["prompt"] = gr.Textbox(
            label="Prompt",
            lines=2,
            elem_id="prompt",
            max_length=pipeline.LIMITS.prompt_chars,
            value=prompts[0] if prompts else "Explain LoRA in one sentence.",
        )
        with gr.Row():
            ui["max_new_tokens"] = gr.Slider(
                1, pipeline.LIMITS.max_new_tokens, value=48, step=1, label="Max new tokens", elem_id="max-new-tokens"
            )
            ui["temperature"] = gr.Slider(
                0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature"
            )
            ui["seed"] = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        if len(prompts) > 1:
            gr.Examples([[p] for p in prompts], inputs=[ui["prompt"]], label="Example prompts")


def results_section(ui: dict[str, Any], *, empty_table: Any) -> None:
    ui["merge_btn"] = gr.Button("Merge", variant="primary", elem_id="merge-btn")
    ui["error"] = gr.Markdown(visible=False, elem_id="error-box")
    ui["verdict"] = gr.Markdown(elem_id="verdict")
    ui["table"] = gr.Dataframe(
        value=empty_table,
        headers=VerificationReport.HEADERS,
        label="Verification",
        interactive=False,
        wrap=True,
        max_height=1400,
        elem_id="verify-table",
        column_widths=["9%", "24%", "24%", "17%", "7%", "19%"],
    )
    with gr.Row():
        ui["gen_base"] = gr.Textbox(label="Base model alone", lines=4, interactive=False, elem_id="gen-base")
        ui["gen_adapter"] = gr.Textbox(
            label="Base + adapter (PEFT, unmerged)", lines=4, interactive=False, elem_id="gen-adapter"
        )
        ui["gen_merged"] = gr.Textbox(label="Merged model", lines=4, interactive=False, elem_id="gen-merged")
    ui["gen_note"] = gr.Markdown(elem_id="gen-note")
    ui["sizes"] = gr.Markdown(elem_id="sizes")
    with gr.Accordion("Merge summary", open=False):
        ui["summary"] = gr.Textbox(label="Summary", lines=8, interactive=False, elem_id="summary")


def push_section(ui: dict[str, Any]) -> None:
    gr.Markdown("## Push to the Hub")
    with gr.Row():
        ui["repo_name"] = gr.Textbox(
            label="Target repo",
            placeholder="you/model-merged (filled in after the merge)",
            elem_id="repo-name",
            scale=2,
        )
        ui["private"] = gr.Checkbox(label="Private", value=False, elem_id="private")
        ui["push_mode"] = gr.Radio(
            list(pipeline.PUSH_MODE_LABELS), value="Create new repo", label="Push mode", elem_id="push-mode"
        )
    ui["push_btn"] = gr.Button("Push to Hub", interactive=False, elem_id="push-btn")
    with gr.Accordion("Too large for this Space's disk?", open=False):
        ui["stream_btn"] = gr.Button(pipeline.STREAM_BUTTON, elem_id="stream-btn")
        gr.Markdown(pipeline.STREAM_INFO, elem_id="stream-info")
    ui["push_result"] = gr.Markdown(visible=False, elem_id="push-result")
