"""A real browser for the tests of pages: Debian's Chromium driven by Playwright (the `browser` and
`page_errors` fixtures live in tests/conftest.py). Outside CI the tests skip without Chromium;
.ci/run installs it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def launch_browser():
    """Yields a Chromium browser, or skips (fails in CI) where there is none."""
    executable = chromium_path()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: .ci/run installs Debian's chromium")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's own sandbox cannot start.
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, url: str, errors: list, **context_options):
    """A page at url whose script errors, console errors and dialogs are appended to errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, **context_options)
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append(f"a dialog opened: {dialog.message}") or dialog.dismiss())
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.goto(url)
    return page


def screenshot(page, name: str, tmp_path: Path) -> None:
    """A screenshot in tmp_path, copied to docs/images when LEAPLLM_DOCS_SCREENSHOTS=1."""
    page.screenshot(path=str(tmp_path / name), full_page=False)
    if os.environ.get("LEAPLLM_DOCS_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, DOCS_IMAGES / name)
