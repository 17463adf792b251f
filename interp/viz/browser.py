"""A headless Chromium driven by selenium: for checking pages as a reader sees them, and screenshots.

Uses Debian's ``chromium`` and ``chromium-driver`` (``make browser`` installs them where apt-get
can) and the ``selenium`` package; selenium's own driver download is never used.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


def browser_problem() -> str | None:
    """None when a headless Chromium can be driven here, else what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not _binary():
        return "no chromium binary on PATH (make browser, or apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (make browser, or apt-get install chromium-driver)"
    return None


def _binary() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


@contextlib.contextmanager
def headless_chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A selenium Chrome driver on a fresh profile, with the console log recorded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    problem = browser_problem()
    if problem:
        raise RuntimeError(problem)
    with tempfile.TemporaryDirectory(prefix="interp-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = _binary()
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            yield driver
        finally:
            driver.quit()
