"""The playground against a service with API keys: it asks for the key, then works with it."""

from __future__ import annotations

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.pages.browser import (
    API_KEY,
    WAIT_S,
    NetworkLog,
    bars,
    listed_models,
    model_for,
    run,
    screenshot,
    shown_error,
    text_of,
    type_into,
)


def _key_requested(driver) -> bool:
    panel = driver.find_element(By.ID, "key-panel")
    return panel.get_attribute("open") is not None and "attention" in panel.get_attribute("class")


def _give_key(driver, key: str) -> None:
    type_into(driver, "api-key", key)
    driver.find_element(By.ID, "save-key").click()


def test_the_page_asks_for_the_key_and_works_once_it_is_typed(keyed_server, browser, tmp_path):
    models, _ = listed_models(keyed_server.url, headers={"Authorization": f"Bearer {API_KEY}"})
    model = model_for(models, "classify")
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(keyed_server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").is_enabled() or _key_requested(d))
    if _key_requested(browser):  # this build keeps the model list behind the key too
        screenshot(browser, tmp_path / "auth-asked-for-models.png")
        _give_key(browser, API_KEY)
        wait.until(lambda d: d.find_element(By.ID, "model").is_enabled())
    Select(browser.find_element(By.ID, "model")).select_by_value(model["name"])
    wait.until(lambda d: d.find_element(By.ID, "run").is_enabled())
    type_into(browser, "classify-text", "A key is needed for this one.")

    if browser.execute_script("return sessionStorage.length") == 0:
        # No key yet: the task endpoint answers 401; the page shows it and asks for the key.
        run(browser)
        assert _key_requested(browser)
        message = shown_error(browser)
        assert message and "API key" in message
        assert message in text_of(browser.find_element(By.ID, "key-message"))
        assert bars(browser) == []
        screenshot(browser, tmp_path / "auth-asked.png")
        # A wrong key: still 401, with the API's message.
        result = browser.find_element(By.ID, "result")
        done = int(result.get_attribute("data-done"))
        _give_key(browser, "not-the-key")
        wait.until(lambda d: int(d.find_element(By.ID, "result").get_attribute("data-done")) > done)
        assert shown_error(browser) == "the API key is not valid"
        assert _key_requested(browser)
        # The right key: the interrupted request runs again by itself.
        done = int(result.get_attribute("data-done"))
        _give_key(browser, API_KEY)
        wait.until(lambda d: int(d.find_element(By.ID, "result").get_attribute("data-done")) > done)
    assert shown_error(browser) is None
    assert len(bars(browser)) >= 2
    assert not _key_requested(browser)
    assert browser.execute_script("return sessionStorage.getItem('albert-serve.api-key')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0  # not remembered unless asked
    screenshot(browser, tmp_path / "auth-works.png")

    # Typed once: a reload in the same tab keeps it.
    browser.refresh()
    wait.until(lambda d: d.find_element(By.ID, "model").is_enabled())
    Select(browser.find_element(By.ID, "model")).select_by_value(model["name"])
    wait.until(lambda d: d.find_element(By.ID, "run").is_enabled())
    assert text_of(browser.find_element(By.ID, "key-state")) == "set"
    run(browser)
    assert shown_error(browser) is None and len(bars(browser)) >= 2
    outside = NetworkLog(browser).outside(keyed_server.url)
    assert outside == []
