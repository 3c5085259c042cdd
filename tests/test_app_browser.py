"""The app in a real browser: `python app.py` as a subprocess, driven by Playwright + Debian chromium.

The Hub is the local test server (tests/hubserver.py) bound to the HF_ENDPOINT that conftest
chose, so the app subprocess (which inherits os.environ) talks to it and to nothing else.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import HUB_PORT
from tests.hubserver import HubServer

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = Path(os.environ.get("LMS_DEMO_DIR") or REPO / "demo")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MERGE_TIMEOUT_MS = 300_000  # a demo merge takes ~5 s idle; a busy shared machine can be 10x slower
ALICE = "hf_alice_browser_write_token_0123456789"

VERDICT_DONE = (
    "() => /All \\d+ checks passed|checks? failed/.test((document.querySelector('#verdict') || {}).innerText || '')"
)
# gr.Dataframe renders a virtual grid: cells are [role=gridcell] with data-row / data-col.
READ_TABLE = """() => {
  const rows = {};
  for (const cell of document.querySelectorAll('#verify-table [role=gridcell][data-row][data-col]')) {
    (rows[+cell.dataset.row] = rows[+cell.dataset.row] || [])[+cell.dataset.col] = cell.textContent.trim();
  }
  const grid = document.querySelector('#verify-table [role=grid]');
  return {rows: Object.keys(rows).sort((a, b) => a - b).map(k => rows[k]),
          declared: grid ? +grid.getAttribute('aria-rowcount') - 1 : -1};
}"""
HEADERS = ["group", "check", "value", "threshold", "result", "detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lms_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("lms-"))


@pytest.fixture(scope="module", autouse=True)
def demo_present() -> None:
    if not (DEMO_DIR / "base").is_dir() or not (DEMO_DIR / "adapter").is_dir():
        pytest.fail(f"The bundled demo is missing ({DEMO_DIR}); build it with `python scripts/make_demo.py`.")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(tmp_path_factory.mktemp("browser-hub"), port=HUB_PORT).start()
    assert os.environ["HF_ENDPOINT"] == server.url
    server.add_user("alice", ALICE, write=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app_server(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`python app.py` with its own TMPDIR (to watch the per-merge folders) and a free port."""
    port = _free_port()
    tmpdir = tmp_path_factory.mktemp("app-tmp")
    log_path = tmpdir.parent / "app-server.log"
    env = dict(
        os.environ,
        GRADIO_SERVER_PORT=str(port),
        GRADIO_SERVER_NAME="127.0.0.1",
        TMPDIR=str(tmpdir),
        PYTHONUNBUFFERED="1",
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600  # ~20 s idle (torch + gradio imports); generous for a busy machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within 600s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.3)
        yield {"url": url, "tmpdir": tmpdir, "log": log_path, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser: Browser, url: str) -> Page:
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#merge-btn")
    return page


def fill(page: Page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def choose_dtype(page: Page, dtype: str) -> None:
    page.locator("#dtype input").click()
    page.get_by_role("option", name=dtype, exact=True).click()
    assert page.locator("#dtype input").input_value() == dtype


def wait_for_verdict(page: Page) -> str:
    page.wait_for_function(VERDICT_DONE, timeout=MERGE_TIMEOUT_MS)
    return page.locator("#verdict").inner_text()


def read_table(page: Page) -> list[dict[str, str]]:
    page.wait_for_selector("#verify-table [role=gridcell][data-row]", state="attached")
    table = page.evaluate(READ_TABLE)
    assert table["declared"] == len(table["rows"]) > 0, table
    return [dict(zip(HEADERS, row, strict=False)) for row in table["rows"]]


def generation(page: Page, which: str) -> str:
    return page.locator(f"#gen-{which} textarea").input_value()


def merge_demo(page: Page, dtype: str | None = None) -> str:
    fill(page, "adapter-id", "demo/adapter")
    fill(page, "base-id", "demo/base")
    if dtype:
        choose_dtype(page, dtype)
    page.click("#merge-btn")
    verdict = wait_for_verdict(page)
    page.wait_for_selector("#merge-btn:not([disabled])")
    return verdict


def test_merge_demo_in_the_browser(app_server: dict, browser: Browser) -> None:
    page = open_page(browser, app_server["url"])
    assert page.locator("#push-btn").is_disabled()
    verdict = merge_demo(page)
    assert "All" in verdict and "checks passed" in verdict, verdict

    rows = read_table(page)
    assert len(rows) >= 10 and {"structure", "numerics", "function"} <= {r["group"] for r in rows}
    for row in rows:
        assert row["result"] in ("pass", "skipped"), row
        assert row["result"] == "pass" or row["detail"].startswith("skipped"), row
    assert not any(r["result"] == "FAIL" for r in rows)

    base, adapter, merged = generation(page, "base"), generation(page, "adapter"), generation(page, "merged")
    assert merged and merged == adapter
    assert base != adapter
    # Merged vs separate, measured: a generation rate for each of the two.
    note = page.locator("#gen-note")
    assert "Merged vs separate" in note.inner_text()
    rate = note.locator("tr", has_text="tokens/s").locator("td").all_inner_texts()
    assert len(rate) == 3 and all(float(cell.split()[0]) > 0 for cell in rate[1:]), rate
    sizes = page.locator("#sizes").inner_text()
    assert "Adapter" in sizes and "MB" in sizes and "GB" in sizes
    assert page.locator("#push-btn").is_enabled()
    assert page.locator("#repo-name input, #repo-name textarea").first.input_value().endswith("-merged")
    assert page.locator("#error-box").is_hidden()

    shots = REPO / "artifacts" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "merge-demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    docs_shot = REPO / "docs" / "screenshot.png"
    if not docs_shot.exists():
        docs_shot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, docs_shot)

    # Without login or token, Push explains how to log in.
    page.click("#push-btn")
    page.wait_for_selector("#error-box:has-text('paste a write token')")
    assert "sign in with hugging face" in page.locator("#error-box").inner_text().lower()
    page.context.close()


def test_bad_adapter_shows_its_error_then_a_merge_works(app_server: dict, browser: Browser) -> None:
    page = open_page(browser, app_server["url"])
    before = set(_lms_dirs(app_server["tmpdir"]))
    fill(page, "adapter-id", "nobody/does-not-exist")
    page.click("#merge-btn")
    error = page.locator("#error-box")
    error.wait_for(state="visible", timeout=MERGE_TIMEOUT_MS)
    page.wait_for_selector("#error-box:has-text('was not found')")
    assert "nobody/does-not-exist" in error.inner_text()
    assert "Traceback" not in page.content()
    assert page.locator("#push-btn").is_disabled()
    assert set(_lms_dirs(app_server["tmpdir"])) <= before  # the failed merge left no folder

    verdict = merge_demo(page)
    assert "checks passed" in verdict, verdict
    error.wait_for(state="hidden")
    assert generation(page, "merged") == generation(page, "adapter")
    assert page.locator("#push-btn").is_enabled()
    page.context.close()


def test_two_pages_merge_at_once_with_their_own_results(app_server: dict, browser: Browser) -> None:
    pages = {dtype: open_page(browser, app_server["url"]) for dtype in ("float32", "bfloat16")}
    for dtype, page in pages.items():
        fill(page, "adapter-id", "demo/adapter")
        fill(page, "base-id", "demo/base")
        choose_dtype(page, dtype)
    for page in pages.values():
        page.click("#merge-btn")
    for dtype, page in pages.items():
        wait_for_verdict(page)
        rows = {r["check"]: r for r in read_table(page)}
        assert rows["dtype as asked"]["threshold"] == f"all floating tensors {dtype}", rows["dtype as asked"]
        assert rows["dtype as asked"]["result"] == "pass"
        assert generation(page, "merged")
    assert generation(pages["float32"], "merged") == generation(pages["float32"], "adapter")
    # Each session holds its own folder.
    assert len(_lms_dirs(app_server["tmpdir"])) >= 2

    # Closing the tabs ends the sessions: their merge folders go (demo.unload -> gr.State delete_callback).
    for page in pages.values():
        page.context.close()
    deadline = time.monotonic() + 60
    while _lms_dirs(app_server["tmpdir"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _lms_dirs(app_server["tmpdir"]) == []


def test_push_from_the_browser_with_a_pasted_token(app_server: dict, browser: Browser, hub: HubServer) -> None:
    page = open_page(browser, app_server["url"])
    verdict = merge_demo(page)
    assert "checks passed" in verdict, verdict
    fill(page, "token-box", ALICE)
    fill(page, "repo-name", "browser-merged")
    page.click("#push-btn")
    result = page.locator("#push-result")
    result.wait_for(state="visible", timeout=MERGE_TIMEOUT_MS)
    page.wait_for_selector("#push-result:has-text('Pushed to')")
    assert "alice/browser-merged" in result.inner_text()
    link = result.locator("a", has_text="alice/browser-merged").first.get_attribute("href")
    assert link == f"{hub.url}/alice/browser-merged"
    # The next steps name the pushed repo (transformers, vLLM, TGI).
    assert 'from_pretrained("alice/browser-merged"' in result.inner_text()
    assert "vllm serve alice/browser-merged" in result.inner_text()
    files = hub.repo_files("alice/browser-merged")
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(files)
    assert ALICE.encode() not in b"".join(files.values())
    assert ALICE not in page.content()
    assert page.locator("#error-box").is_hidden()
    page.context.close()
    assert ALICE not in app_server["log"].read_text()


def test_a_pull_request_without_discussion_write_is_refused_before_the_merge(
    app_server: dict, browser: Browser, hub: HubServer
) -> None:
    """Issue #15: a token lacking the pull-request permission, PR mode chosen: Merge refuses at once, naming it."""
    token = "hf_alice_browser_fine_grained_0123456789"
    hub.state.add_fine_grained_token("alice", token, scoped={"alice": ("repo.read", "repo.write")})
    page = open_page(browser, app_server["url"])
    before = set(_lms_dirs(app_server["tmpdir"]))
    fill(page, "token-box", token)
    fill(page, "adapter-id", "demo/adapter")
    fill(page, "base-id", "demo/base")
    fill(page, "repo-name", "alice/browser-pr-target")
    page.locator("#push-mode").get_by_text("Open a pull request").click()
    hub.clear_log()
    page.click("#merge-btn")
    error = page.locator("#error-box")
    error.wait_for(state="visible", timeout=MERGE_TIMEOUT_MS)
    message = error.inner_text()
    assert "Opening a pull request needs the permission discussion.write on alice/browser-pr-target" in message
    assert "fine-grained" in message and "/settings/tokens" in message, message
    assert [r.path for r in hub.request_log] == ["/api/whoami-v2"]  # the check, and nothing else
    assert page.locator("#verdict").inner_text().strip() == "" and page.locator("#push-btn").is_disabled()
    assert set(_lms_dirs(app_server["tmpdir"])) <= before  # no merge folder was made
    assert token not in page.content()
    page.context.close()
    assert token not in app_server["log"].read_text()
