"""Property-based requests over the OpenAPI schema, and the web page in headless Chromium."""

from __future__ import annotations

import shutil
import time

import pytest

from medsig.serve import ServeSettings, create_app
from tests.browser import browser, severe_logs
from tests.test_serve import LiveServer, serve_env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = serve_env(tmp_path_factory)
    srv = LiveServer(create_app(env.predictor, store=env.store, collection=env.collection,
                                settings=ServeSettings(api_key=None)))
    srv.env = env
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    env = serve_env(tmp_path_factory)
    srv = LiveServer(create_app(env.predictor, store=env.store, collection=env.collection,
                                settings=ServeSettings(api_key="page-key")))
    srv.env = env
    yield srv
    srv.stop()


# -- OpenAPI property-based ------------------------------------------------------------------
def test_schema_generated_requests_never_get_a_server_error(server) -> None:
    """~100 requests generated from /openapi.json (bounded to ~30 s): every answer < 500."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 6
    budget = time.monotonic() + 30
    seen: dict[str, set[int]] = {}
    calls = []

    def explore(op) -> None:
        label = f"{op.method.upper()} {op.path}"

        @settings(max_examples=20, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case) -> None:
            response = case.call(base_url=server.url, timeout=20)
            seen.setdefault(label, set()).add(response.status_code)
            calls.append(label)
            assert response.status_code < 500, (label, response.status_code, response.text)
            if response.status_code >= 400:  # every error is a JSON error body
                assert set(response.json()) == {"error"}, response.text
            case.validate_response(response, checks=[not_a_server_error])

        check()

    for op in operations:
        if time.monotonic() < budget:
            explore(op)
    assert {"POST /v1/predict", "POST /v1/search", "GET /health"} <= set(seen)
    assert len(calls) >= 50, len(calls)
    print(f"{len(calls)} generated requests, status codes: "
          + "; ".join(f"{k} {sorted(v)}" for k, v in sorted(seen.items())))


# -- the web page ----------------------------------------------------------------------------
def _wait(driver, css: str, count: int = 1, timeout: float = 30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        lambda d: (found := d.find_elements(By.CSS_SELECTOR, css)) and len(found) >= count
        and found)


def test_web_page_shows_scores_summary_and_similar_cases(server, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    env = server.env
    photo = tmp_path / "upload.jpg"
    shutil.copy(env.images[3], photo)
    driver = browser("1100,1400")
    try:
        driver.get(server.url + "/")
        _wait(driver, "#status")
        driver.find_element(By.ID, "file").send_keys(str(photo))
        cards = _wait(driver, "#labels .label", count=len(env.meta["heads"]))
        assert [c.get_attribute("data-label") for c in cards] == \
            [h["name"] for h in env.meta["heads"]]
        assert driver.find_elements(By.CSS_SELECTOR, "#labels .threshold")
        explains = driver.find_elements(By.CSS_SELECTOR, "#labels .explain")
        assert len(explains) == len(cards) and any(e.text.startswith("P(") for e in explains)
        summary = driver.find_element(By.ID, "summary").text
        assert "not a diagnosis" in summary and "urgency:" in summary
        cases = _wait(driver, "#similar .case", count=8)
        assert cases[0].get_attribute("data-id") == env.ids[3]
        _wait(driver, "#similar .case img[src^='blob:']", count=8)
        loaded = driver.execute_script(
            "return [...document.querySelectorAll('#similar img')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length")
        assert loaded == 8
        assert "urgency" in cases[0].text
        assert "same image as the query" in cases[0].text and "split: " in cases[0].text
        assert "same image as the query" not in cases[1].text
        time.sleep(0.3)
        driver.save_screenshot("/tmp/medsig-serve-page.png")
        assert severe_logs(driver) == []
    finally:
        driver.quit()


def test_web_page_with_an_api_key(keyed_server, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    env = keyed_server.env
    photo = tmp_path / "upload.png"
    shutil.copy(env.images[4], photo)
    driver = browser("1100,1400")
    try:
        driver.get(keyed_server.url + "/")
        _wait(driver, "#model")
        time.sleep(0.2)
        assert "API key required" in driver.find_element(By.ID, "model").text
        driver.find_element(By.ID, "file").send_keys(str(photo))
        error = _wait(driver, "#error:not([hidden])")[0]
        assert "API key" in error.text  # asked for the key instead of failing a request
        driver.find_element(By.ID, "api-key").send_keys("page-key")
        driver.find_element(By.ID, "file").send_keys(str(photo))
        _wait(driver, "#labels .label", count=len(env.meta["heads"]))
        _wait(driver, "#similar .case img[src^='blob:']", count=8)
        assert severe_logs(driver) == []
    finally:
        driver.quit()
