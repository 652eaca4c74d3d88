"""The evaluation report (report.html) in headless Chromium: no errors, every figure decodes."""

from __future__ import annotations

from tests.browser import browser, severe_logs
from tests.test_eval_run import eval_env


def test_report_page_renders_every_figure(tmp_path_factory) -> None:
    from selenium.webdriver.common.by import By

    env = eval_env(tmp_path_factory)
    page = (env.out / "report.html").resolve()
    driver = browser()
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
        assert severe_logs(driver) == []
    finally:
        driver.quit()
