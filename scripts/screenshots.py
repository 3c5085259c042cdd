"""Regenerate the README's screenshots: the app after merging the bundled demo, in a real browser.

    python scripts/screenshots.py               # writes docs/screenshot.png, -phone.png, -dark.png
    python scripts/screenshots.py --out DIR     # elsewhere

It starts ``python app.py`` on a free port (offline: the demo needs no Hub), merges demo/adapter into
demo/base twice with Playwright and Debian's chromium (never ``playwright install``): once in the light
theme, shot at desktop width (1280 px) and then at phone width (390 px, full page), and once with
gradio's dark theme (``?__theme=dark``) at desktop width. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
MERGE_TIMEOUT_MS = 600_000
VERDICT_DONE = "() => /checks passed|checks? failed/.test((document.querySelector('#verdict') || {}).innerText || '')"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(timeout_s: float = 600) -> Iterator[str]:
    """``python app.py`` on a free port with its own temp folders; yields its URL, stops it after."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="lms-shots-") as tmp:
        env = dict(
            os.environ,
            GRADIO_SERVER_PORT=str(port),
            GRADIO_SERVER_NAME="127.0.0.1",
            GRADIO_ANALYTICS_ENABLED="False",
            HF_HUB_OFFLINE="1",
            HF_HOME=str(Path(tmp) / "hf-home"),
            TMPDIR=tmp,
        )
        log = Path(tmp) / "app.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait_until_up(url, proc, log, timeout_s)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"app.py did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def merged_page(browser: Browser, url: str) -> Page:
    """A page at ``url`` after a demo merge, scrolled to the top."""
    page = browser.new_context(viewport=DESKTOP).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#adapter-id textarea, #adapter-id input").first.fill("demo/adapter")
    page.locator("#base-id textarea, #base-id input").first.fill("demo/base")
    page.click("#merge-btn")
    page.wait_for_function(VERDICT_DONE, timeout=MERGE_TIMEOUT_MS)
    page.wait_for_selector("#merge-btn:not([disabled])")
    page.evaluate("() => window.scrollTo(0, 0)")
    return page


def shoot(page: Page, path: Path) -> None:
    page.wait_for_timeout(500)  # let the layout settle after a resize
    page.screenshot(path=str(path), full_page=True)
    print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with running_app() as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = merged_page(browser, url)
        shoot(page, args.out / "screenshot.png")
        page.set_viewport_size(PHONE)
        shoot(page, args.out / "screenshot-phone.png")
        shoot(merged_page(browser, url + "?__theme=dark"), args.out / "screenshot-dark.png")
        browser.close()


if __name__ == "__main__":
    main()
