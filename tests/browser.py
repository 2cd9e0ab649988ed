"""Load a page in the system Chromium, headless, through Playwright: collect its errors, probe it, screenshot it.

Playwright's Python package ships its own driver; the browser is Debian's chromium
(``executable_path``), so nothing is downloaded (no ``playwright install``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_NAMES", "PageLoad", "find_chromium", "load_page", "page_url"]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The first Chromium on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    """What loading one page showed."""

    errors: list[str] = field(default_factory=list)
    probe: Any = None
    screenshot: bytes = b""


def load_page(url: str, probe_js: str, *, width: int = 1280, height: int = 1000, timeout: float = 45.0) -> PageLoad:
    """Open ``url`` in headless Chromium, wait for load, evaluate ``probe_js`` (JSON result), screenshot the viewport.

    Args:
        url: the page (``file://`` URLs work).
        probe_js: a JavaScript expression whose JSON-serialisable value is returned as ``probe``.
        width: viewport width in CSS pixels (device scale factor 1).
        height: viewport height.
        timeout: seconds for the load and the probe.

    Returns:
        The console errors, uncaught exceptions and failed requests of the page, the probe's value and a PNG.
    """
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (make test-deps installs it: apt-get install chromium)")
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.set_default_timeout(timeout * 1000)
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type in ("error", "assert") else None)
            page.on("pageerror", lambda e: errors.append(f"exception: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"log: {r.failure} {r.url}"))
            page.goto(url, wait_until="load")
            probe = page.evaluate(probe_js)
            shot = page.screenshot(type="png")
            page.wait_for_timeout(500)  # late console messages
            return PageLoad(errors=list(errors), probe=probe, screenshot=shot)
        finally:
            browser.close()


def page_url(path: Path) -> str:
    """A ``file://`` URL for ``path``."""
    return Path(path).resolve().as_uri()
