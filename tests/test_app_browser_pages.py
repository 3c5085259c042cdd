"""The app in a real browser, as people reach it: the adapter picker, a phone-wide screen, the dark theme.

The fixtures are tests/test_app_browser.py's (app server, chromium, local Hub); this module's app runs
with LMS_ALLOW_LOCAL_PATHS=1, so a local folder of adapters can be picked from as well as a Hub repo.
One merge in all: the picked adapter, at 390 px, in the dark theme.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, Page

from tests import test_app_browser as shared
from tests.hubserver import HubServer
from tests.test_app_browser import DEMO_DIR, _lms_dirs, fill, generation, read_table, wait_for_verdict

# The shared module's fixtures, module-scoped: this module gets its own app, chromium and local Hub.
app_server, browser, hub, demo_present = shared.app_server, shared.browser, shared.hub, shared.demo_present

PHONE = {"width": 390, "height": 844}
OVERFLOW_TOLERANCE_PX = 2  # sub-pixel rounding of borders
# The colour an element's text is drawn on: the first ancestor with an opaque background.
COLOURS = """(selector) => {
  const parse = c => (c.match(/[\\d.]+/g) || []).map(Number);
  const behind = el => {
    for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
      const bg = parse(getComputedStyle(node).backgroundColor);
      if (bg.length === 3 || bg[3] > 0.5) return bg.slice(0, 3);
    }
    return parse(getComputedStyle(document.documentElement).backgroundColor).slice(0, 3);
  };
  const el = document.querySelector(selector);
  return {text: parse(getComputedStyle(el).color).slice(0, 3), background: behind(el),
          page: behind(document.querySelector('#verdict'))};
}"""


@pytest.fixture(scope="module", autouse=True)
def local_paths_allowed() -> Iterator[None]:
    """Before the app starts (autouse runs first): this module's app may read any local folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMS_ALLOW_LOCAL_PATHS", "1")
        yield


@pytest.fixture(scope="module")
def adapters(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """alice/multi (chat/ and code/, PEFT's multi-adapter layout), alice/single, and a local folder of two."""
    code = tmp_path_factory.mktemp("code") / "code"
    shutil.copytree(DEMO_DIR / "adapter", code)
    config = json.loads((code / "adapter_config.json").read_text())
    (code / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    files = {f"chat/{p.name}": p for p in (DEMO_DIR / "adapter").iterdir()}
    files |= {f"code/{p.name}": p for p in code.iterdir()}
    for repo_id, repo_files in (("alice/multi", files), ("alice/single", dict(_root(DEMO_DIR / "adapter")))):
        hub.create_repo(repo_id)
        hub.add_files(repo_id, repo_files)
    local = tmp_path_factory.mktemp("local-adapters")
    for name in ("one", "two"):
        shutil.copytree(DEMO_DIR / "adapter", local / name)
    return {"hub": "alice/multi", "single": "alice/single", "local": str(local)}


def _root(folder: Path) -> Iterator[tuple[str, Path]]:
    return ((p.name, p) for p in folder.iterdir())


def _pick(page: Page, label: str, expected_id: str) -> list[str]:
    """Open the picker, pick ``label``, wait for the adapter field to read ``expected_id``; the options seen."""
    page.locator("#adapter-choice input").click()
    options = [o.inner_text().strip() for o in page.get_by_role("option").all()]
    page.get_by_role("option", name=label, exact=True).click()
    page.wait_for_function(
        "(id) => document.querySelector('#adapter-id textarea, #adapter-id input').value === id", arg=expected_id
    )
    return options


def _leave_adapter_field(page: Page, text: str) -> None:
    fill(page, "adapter-id", text)
    page.locator("#adapter-id textarea, #adapter-id input").first.blur()


def _luminance(rgb: list[float]) -> float:
    def channel(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: list[float], b: list[float]) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _within_width(page: Page, selector: str, width: int) -> None:
    page.locator(selector).scroll_into_view_if_needed()
    assert page.locator(selector).is_visible(), selector
    box = page.locator(selector).bounding_box()
    assert box is not None and box["x"] >= -OVERFLOW_TOLERANCE_PX, (selector, box)
    assert box["x"] + box["width"] <= width + OVERFLOW_TOLERANCE_PX, (selector, box)


def test_picking_a_hub_adapter_on_a_phone_in_the_dark_merges_it(
    app_server: dict, browser: Browser, adapters: dict[str, str]
) -> None:
    page = browser.new_context(viewport=PHONE).new_page()
    page.set_default_timeout(30_000)
    page.goto(app_server["url"] + "?__theme=dark")
    page.wait_for_selector("#merge-btn")
    assert page.locator("#adapter-choice").is_hidden()
    fill(page, "adapter-id", adapters["hub"])
    page.locator("#adapter-id textarea, #adapter-id input").first.press("Enter")
    page.wait_for_selector("#adapter-choice", state="visible")
    assert _pick(page, "code", "alice/multi/code") == ["chat", "code"]
    fill(page, "base-id", "demo/base")  # leaving the adapter field keeps the picked entry
    page.click("#merge-btn")
    verdict = wait_for_verdict(page)
    assert "checks passed" in verdict, verdict
    # The picked subfolder was merged: the suggested name is its own, and merged == base + adapter.
    assert page.locator("#repo-name input, #repo-name textarea").first.input_value().endswith("code-merged")
    assert generation(page, "merged") == generation(page, "adapter") != generation(page, "base")
    assert page.locator("#adapter-choice").is_visible() and page.locator("#error-box").is_hidden()

    # Phone width: nothing wider than the screen; the button and the results are on it.
    scroll_width = page.evaluate("() => document.scrollingElement.scrollWidth")
    assert scroll_width <= PHONE["width"] + OVERFLOW_TOLERANCE_PX, scroll_width
    for selector in ("#merge-btn", "#verdict", "#verify-table", "#gen-note", "#push-btn"):
        _within_width(page, selector, PHONE["width"])
    assert len(read_table(page)) >= 10
    # The table keeps readable columns (a word per line, not a letter) and scrolls sideways in its own frame.
    widths = page.evaluate(
        "() => [...document.querySelectorAll('#verify-table th.header-cell')].map(c => c.offsetWidth)"
    )
    assert len(widths) == 6 and min(widths) >= 40 and widths[1] >= 120, widths

    # Dark theme: a dark page, and the table's text readable on it (WCAG AA contrast, 4.5:1).
    colours = page.evaluate(COLOURS, "#verify-table [role=gridcell][data-row='0'][data-col='1']")
    assert _luminance(colours["page"]) < 0.05, colours
    assert _contrast(colours["text"], colours["background"]) >= 4.5, colours
    page.context.close()


def test_picker_follows_links_local_folders_and_retyped_ids_without_merging(
    app_server: dict, browser: Browser, adapters: dict[str, str]
) -> None:
    before = set(_lms_dirs(app_server["tmpdir"]))
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    page.goto(app_server["url"] + "?adapter=" + quote(adapters["local"], safe=""))
    page.wait_for_selector("#adapter-choice", state="visible")  # a link fills the field, then it is listed
    assert _pick(page, "two", f"{adapters['local']}/two") == ["one", "two"]
    _leave_adapter_field(page, "nobody/does-not-exist")  # unlisted: the picker goes, quietly
    page.wait_for_selector("#adapter-choice", state="hidden")
    _leave_adapter_field(page, adapters["hub"])
    page.wait_for_selector("#adapter-choice", state="visible")
    _leave_adapter_field(page, adapters["single"])  # one adapter at the top level: nothing to pick
    page.wait_for_selector("#adapter-choice", state="hidden")

    # Listing and picking never merged: no verdict, no error, no merge folder.
    assert page.locator("#verdict").inner_text().strip() == ""
    assert page.locator("#error-box").is_hidden()
    assert set(_lms_dirs(app_server["tmpdir"])) <= before
    page.context.close()
    assert "Traceback" not in app_server["log"].read_text()
