"""The evaluation report (report.html) in headless Chromium: no errors, every figure decodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_eval_run import eval_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium is absent (/usr/bin/chromium, /usr/bin/chromedriver): "
                    "run scripts/ensure-chromium.sh to enable the report page test")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1300,1400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _severe(driver) -> list[str]:
    try:
        logs = driver.get_log("browser")
    except Exception:  # noqa: BLE001 - drivers without the log endpoint
        return []
    return [e["message"] for e in logs if e["level"] == "SEVERE"]


def test_report_page_renders_every_figure(tmp_path_factory) -> None:
    from selenium.webdriver.common.by import By

    env = eval_env(tmp_path_factory)
    page = (env.out / "report.html").resolve()
    driver = _browser()
    try:
        driver.get(page.as_uri())
        assert "medsig evaluation" in driver.title
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 5
        widths = driver.execute_script(
            "return [...document.images].map(i => i.complete ? i.naturalWidth : 0)")
        assert all(w > 0 for w in widths), widths
        tables = driver.find_elements(By.TAG_NAME, "table")
        assert len(tables) >= 6
        headers = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert "How to read this report" in headers and "Figures" in headers
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(r => r.name)")
        assert all(r.startswith("data:") for r in resources), resources  # nothing fetched
        driver.save_screenshot(str(env.out / "report-page.png"))
        assert _severe(driver) == []
    finally:
        driver.quit()
