"""The app as other pages and programs use it: a deep link that prefills the form (in the browser) and the
named API endpoints driven with the real gradio_client, both against `python app.py` on a free port."""

from __future__ import annotations

from urllib.parse import urlencode

from playwright.sync_api import Browser

from tests import test_app_browser as in_browser

# The browser tests' module fixtures, each started again for this module: the app on a free port, the local Hub.
app_server, browser, demo_present, hub = (
    in_browser.app_server,
    in_browser.browser,
    in_browser.demo_present,
    in_browser.hub,
)
open_page = in_browser.open_page


def field_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def test_a_deep_link_prefills_the_form_and_starts_nothing(app_server: dict, browser: Browser) -> None:
    query = {"adapter": "demo/adapter", "base": "demo/base", "adapter_revision": "v2", "base_revision": "main"}
    page = open_page(browser, app_server["url"] + "?" + urlencode(query))
    page.wait_for_function("() => document.querySelector('#adapter-id textarea, #adapter-id input').value !== ''")
    page.get_by_text("Advanced").click()  # the revisions sit in the closed accordion
    assert {name: field_value(page, elem) for name, elem in [
        ("adapter", "adapter-id"), ("base", "base-id"), ("adapter_revision", "adapter-revision"),
        ("base_revision", "base-revision"),
    ]} == query  # fmt: skip
    assert page.locator("#verdict").inner_text().strip() == ""  # no merge started by the link
    assert page.locator("#push-btn").is_disabled() and page.locator("#error-box").is_hidden()
    page.context.close()

    refused = open_page(browser, app_server["url"] + "?" + urlencode({"adapter": "/etc", "base": "demo/base"}))
    refused.wait_for_selector("#error-box:has-text('Not filled in from the link')")
    assert "'/etc' is a local path" in refused.locator("#error-box").inner_text()
    assert field_value(refused, "adapter-id") == "" and field_value(refused, "base-id") == "demo/base"
    refused.context.close()


def test_the_named_api_merges_and_pushes_with_gradio_client(app_server: dict, hub) -> None:
    from gradio_client import Client

    client = Client(app_server["url"], verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/merge", "/push"} <= set(endpoints)
    labels = [p["label"] for p in endpoints["/merge"]["parameters"]]
    assert labels[:3] == ["or paste a write token", "Adapter", "Base model (optional)"]
    assert labels[-2:] == ["Target repo", "Push mode"]

    # Positional, in the page's order (README, "The app"): token, adapter, base, dtype, ... repo name.
    merged = client.predict(
        "", "demo/adapter", "demo/base", "auto", "", "", "5GB", "auto (when it fits in memory)", "stack", None,
        [], "dequantized", "Hello", 8, 0.0, 0, "api-merged", api_name="/merge",
    )  # fmt: skip
    error, verdict, table, gen_base, gen_adapter, gen_merged, note, sizes, summary, repo_name = merged
    assert "checks passed" in str(verdict), merged
    assert gen_merged and gen_merged == gen_adapter != gen_base
    assert "Merged vs separate, measured" in note and "| needs PEFT at inference | yes | no |" in note
    assert table["headers"] == ["group", "check", "value", "threshold", "result", "detail"] and table["data"]

    push_result, push_error = client.predict(in_browser.ALICE, "api-merged", False, "Create new repo", api_name="/push")
    assert "alice/api-merged" in str(push_result) and "vllm serve alice/api-merged" in str(push_result), push_error
    assert "model.safetensors" in hub.repo_files("alice/api-merged")


def streamable(hub, tmp_path, name: str) -> str:
    """The demo on the Hub: acme/NAME-base and alice/NAME-lora, whose config names that base."""
    import json
    import shutil

    adapter = shutil.copytree(in_browser.DEMO_DIR / "adapter", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = f"acme/{name}-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for repo, folder in [(f"acme/{name}-base", in_browser.DEMO_DIR / "base"), (f"alice/{name}-lora", adapter)]:
        hub.create_repo(repo)
        hub.upload_dir(repo, folder)
    return f"alice/{name}-lora"


def test_the_streamed_mode_merges_straight_to_the_hub_with_gradio_client(app_server: dict, hub, tmp_path) -> None:
    """'Merge straight to my Hub repo' as /merge_to_hub: the merge's fields then private and push mode; the
    merge's outputs then the push result (link and snippets), one commit, nothing kept to push again."""
    from gradio_client import Client

    assert streamable(hub, tmp_path, "api") == "alice/api-lora"
    client = Client(app_server["url"], verbose=False)
    endpoint = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/merge_to_hub"]
    labels = [p["label"] for p in endpoint["parameters"]]
    assert labels[:2] == ["or paste a write token", "Adapter"]
    assert labels[-3:] == ["Target repo", "Private", "Push mode"]
    out = client.predict(
        in_browser.ALICE, "alice/api-lora", "", "auto", "", "", "5GB", "auto (when it fits in memory)", "stack", None,
        [], "dequantized", "Hello", 8, 0.0, 0, "api-streamed", False, "Create new repo", api_name="/merge_to_hub",
    )  # fmt: skip
    error, verdict, _table, _b, _a, gen_merged, note, _sizes, _summary, _repo, push_result = out  # buttons: none
    assert "pushed straight to alice/api-streamed" in str(verdict), error
    assert gen_merged == "" and "No sample generation" in note
    assert "vllm serve alice/api-streamed" in str(push_result)
    assert "model.safetensors" in hub.repo_files("alice/api-streamed")


def test_the_streamed_mode_in_the_browser(app_server: dict, browser: Browser, hub, tmp_path) -> None:
    adapter = streamable(hub, tmp_path, "page")
    page = open_page(browser, app_server["url"])
    in_browser.fill(page, "token-box", in_browser.ALICE)
    in_browser.fill(page, "adapter-id", adapter)
    in_browser.fill(page, "repo-name", "page-streamed")
    page.get_by_text("Too large for this Space's disk?").click()
    page.click("#stream-btn")
    result = page.locator("#push-result")
    result.wait_for(state="visible", timeout=in_browser.MERGE_TIMEOUT_MS)
    page.wait_for_selector("#push-result:has-text('Pushed to')", timeout=in_browser.MERGE_TIMEOUT_MS)
    assert "vllm serve alice/page-streamed" in result.inner_text()
    assert "pushed straight to alice/page-streamed" in page.locator("#verdict").inner_text()
    assert "No sample generation" in page.locator("#gen-note").inner_text()
    assert page.locator("#push-btn").is_disabled() and not page.locator("#stream-btn").is_disabled()
    assert "model.safetensors" in hub.repo_files("alice/page-streamed")
    page.context.close()
