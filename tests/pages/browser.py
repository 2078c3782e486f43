"""Headless Chromium driven by Selenium, offline: Debian's chromium and chromedriver, nothing downloaded.

Also the helpers the page tests share: the models a server lists, waiting for the playground's answer, the
URLs a page requested (from Chromium's network log), and full-page screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# A name that resolves to the loopback address inside the browser only: a page served under a name that is
# not "localhost" or "127.0.0.1" shows what a real deployment would load (Swagger UI, for one, calls an online
# validator for any other host unless told not to).
SERVICE_HOST = "albert-serve.test"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    f"--host-resolver-rules=MAP {SERVICE_HOST} 127.0.0.1",
]
_IN_BROWSER = {"data", "blob", "about", "chrome", "chrome-untrusted"}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True}
WAIT_S = 60
API_KEY = "playground-test-key"


def start_chromium(profile: Path, log_path: Path, *, width: int = 1280, height: int = 1000):
    # Never let Selenium Manager look for a driver or a browser to download: both are given explicitly.
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log_path))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    # What the browser loaded for itself before any test page (its new-tab page) is not the pages' doing.
    driver.get("about:blank")
    driver.get_log("performance")
    return driver


def emulate_phone(driver) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True})


def screenshot(driver, path: Path) -> Path:
    """The whole page, not only the viewport; also copied to $ALBERT_PAGES_SCREENSHOT_DIR when set."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    extra = os.environ.get("ALBERT_PAGES_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


class NetworkLog:
    """Every URL the browser's pages asked for, read from Chromium's performance log as it comes.

    `blocked` are those the browser refused to send because the page's Content-Security-Policy forbids them.
    """

    def __init__(self, driver):
        self.driver = driver
        self.urls: list[str] = []
        self.blocked: list[str] = []
        self._by_id: dict[str, str] = {}

    def read(self) -> list[str]:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            method, params = message["method"], message.get("params", {})
            if method == "Network.requestWillBeSent":
                self.urls.append(params["request"]["url"])
                self._by_id[params["requestId"]] = params["request"]["url"]
            elif method == "Network.webSocketCreated":
                self.urls.append(params["url"])
            elif method == "Network.loadingFailed" and params.get("blockedReason") == "csp":
                self.blocked.append(self._by_id.get(params["requestId"], params["requestId"]))
        return self.urls

    def outside(self, origin: str) -> list[str]:
        """Requests that left `origin`. data:, blob: and about: URLs stay in the page; chrome: ones are the
        browser's own pages, not the tested ones'; those the page's CSP blocked were never sent."""
        allowed = urlsplit(origin)
        return [
            url
            for url in self.read()
            if urlsplit(url).scheme not in _IN_BROWSER
            and (urlsplit(url).scheme, urlsplit(url).netloc) != (allowed.scheme, allowed.netloc)
            and url not in self.blocked
        ]


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def listed_models(url: str, headers: dict | None = None) -> tuple[list[dict], bool]:
    """(models, legacy): GET /models, or, on a build without it, one model per endpoint from GET /info."""
    response = httpx.get(url + "/models", headers=headers, timeout=30)
    if response.status_code == 404:
        endpoints = httpx.get(url + "/info", timeout=30).json()["endpoints"]
        models = [
            {"name": name, "task": name, "endpoint": "/" + name, "default": True, "state": entry["state"]}
            for name, entry in endpoints.items()
        ]
        return models, True
    response.raise_for_status()
    return response.json()["models"], False


def model_for(models: list[dict], task: str) -> dict | None:
    """The model the tests use for `task`: its default if ready, else any ready one."""
    ready = [m for m in models if m["task"] == task and m["state"] == "ready"]
    ready.sort(key=lambda m: not m.get("default"))
    return ready[0] if ready else None


# --- the playground page -------------------------------------------------------------------------------


def wait(driver, timeout: float = WAIT_S) -> WebDriverWait:
    return WebDriverWait(driver, timeout)


def open_playground(driver, url: str, model: dict, path: str = "/") -> None:
    driver.get(url + path)
    wait(driver).until(lambda d: d.find_element(By.ID, "model").is_enabled())
    Select(driver.find_element(By.ID, "model")).select_by_value(model["name"])
    wait(driver).until(lambda d: d.find_element(By.ID, "run").is_enabled())
    shown = [
        f.get_attribute("data-task")
        for f in driver.find_elements(By.TAG_NAME, "fieldset")
        if f.is_displayed()
    ]
    assert shown == [model["task"]], f"forms shown for {model['name']}: {shown}"


def type_into(driver, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    if text:
        field.send_keys(text)


def run(driver):
    """Press Run and wait for the answer to be drawn (the result panel counts what it has finished)."""
    result = driver.find_element(By.ID, "result")
    done = int(result.get_attribute("data-done") or 0)
    driver.find_element(By.ID, "run").click()
    wait(driver).until(lambda d: int(d.find_element(By.ID, "result").get_attribute("data-done") or 0) > done)
    return result


def text_of(element) -> str:
    return element.get_attribute("textContent")


def shown_error(driver) -> str | None:
    box = driver.find_element(By.ID, "error")
    return text_of(box.find_element(By.CLASS_NAME, "error-message")) if box.is_displayed() else None


def shown_response(driver):
    return json.loads(text_of(driver.find_element(By.ID, "raw-response")))


def bars(driver) -> list[tuple[str, str]]:
    return [
        (
            text_of(b.find_element(By.CLASS_NAME, "bar-label")),
            text_of(b.find_element(By.CLASS_NAME, "bar-score")),
        )
        for b in driver.find_elements(By.CSS_SELECTOR, "#output .bar")
    ]
