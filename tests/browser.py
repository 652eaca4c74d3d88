"""Headless Chromium for the page tests (Debian chromium + chromedriver, via selenium)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser(window: str = "1300,1400"):
    """A headless Chrome driver with browser logs on; skips when Chromium is absent."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium is absent (/usr/bin/chromium, /usr/bin/chromedriver): "
                    "run scripts/ensure-chromium.sh to enable the page tests")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", f"--window-size={window}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def severe_logs(driver) -> list[str]:
    """SEVERE browser console messages (none for drivers without the log endpoint)."""
    try:
        logs = driver.get_log("browser")
    except Exception:  # noqa: BLE001 - drivers without the log endpoint
        return []
    return [e["message"] for e in logs if e["level"] == "SEVERE"]
