"""`/docs` (Swagger UI) and `/redoc` render with nothing loaded from outside the service.

Each is loaded twice: at 127.0.0.1, and under a host name that only the browser resolves (to 127.0.0.1), as
a deployment would be reached; Swagger UI treats the two differently (it calls an online validator for any
host but localhost unless told not to).
"""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.pages.browser import SERVICE_HOST, WAIT_S, NetworkLog, screenshot


def origin(server, host: str) -> str:
    return server.url.replace("127.0.0.1", host)


@pytest.mark.parametrize("host", ["127.0.0.1", SERVICE_HOST])
def test_swagger_ui_renders_offline(server, browser, tmp_path, host):
    base = origin(server, host)
    browser.get(base + "/docs")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '.opblock .opblock-summary-path[data-path="/classify"]')
    )
    paths = {
        e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert {"/classify", "/fill-mask", "/qa", "/ner", "/health", "/ready"} <= paths
    # Pages are not API operations.
    assert not {"/", "/playground", "/docs", "/redoc"} & paths
    assert browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title")
    network = NetworkLog(browser)
    outside = network.outside(base)
    assert outside == [], f"/docs loaded from outside the service: {outside}"
    assert base + "/static/docs/swagger-ui-bundle.js" in network.urls
    assert base + "/openapi.json" in network.urls
    screenshot(browser, tmp_path / f"docs-{host}.png")


@pytest.mark.parametrize("host", ["127.0.0.1", SERVICE_HOST])
def test_redoc_renders_offline(server, browser, tmp_path, host):
    base = origin(server, host)
    browser.get(base + "/redoc")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '[data-section-id^="operation/"]')
    )
    assert "/classify" in browser.find_element(By.TAG_NAME, "body").get_attribute("textContent")
    network = NetworkLog(browser)
    outside = network.outside(base)
    assert outside == [], f"/redoc loaded from outside the service: {outside}"
    assert base + "/static/docs/redoc.standalone.js" in network.urls
    screenshot(browser, tmp_path / f"redoc-{host}.png")
