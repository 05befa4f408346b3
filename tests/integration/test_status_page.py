"""The status page in headless Chromium, against a real worker on a real broker and Redis.

The page is opened with ?token= (the worker requires a token here), must show the tier
distribution, update by itself when new purchases arrive, look customers up (found and not
found), and run without console errors (a CSP violation would be one). A screenshot is kept as
artifacts/status-page.png.

Chromium and chromedriver come from Debian (`make system-deps`), selenium from the dev extras;
a missing browser or driver fails this test, it does not skip it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis
from tests.integration.conftest import ROOT, run_cli, worker_env
from tests.integration.test_http_api import get_json, replay, wait_until

pytestmark = pytest.mark.integration

TOKEN = "status-page-token-0123456789"
SCREENSHOT = ROOT / "artifacts" / "status-page.png"
WAIT_S = 30
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "chromium and chromedriver are required: install Debian's chromium and "
            "chromium-driver packages (make system-deps)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is required: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # never let Selenium Manager download a browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def text(driver: Any, selector: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.CSS_SELECTOR, selector).text)
    except (NoSuchElementException, StaleElementReferenceException):
        # Stale: the page redrew the table between finding the cell and reading it (it
        # refreshes itself); the waits poll again. Uncaught, it failed a CI run.
        return ""


def wait_for_text(driver: Any, selector: str, expected: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(
            lambda d: text(d, selector) == expected
        )
    except Exception as exc:
        raise AssertionError(
            f"{selector} did not show {expected!r} within {WAIT_S}s: {text(driver, selector)!r}"
        ) from exc


def look_up(driver: Any, customer_id: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "lookup-id")
    box.clear()
    box.send_keys(customer_id, Keys.ENTER)


@pytest.mark.timeout(300)
def test_status_page_in_headless_chromium(
    tmp_path: Path,
    broker: LocalBroker,
    redis_server: LocalRedis,
    make_worker: Any,
    browser: Any,
) -> None:
    env = worker_env(broker, redis_server, MEMBERFLOW_WEB_TOKEN=TOKEN)
    worker = make_worker(env)
    worker.start()
    events = replay(env, tmp_path)
    port = worker.web_port

    def applied() -> bool:
        status, body = get_json(port, "/api/status", TOKEN)
        return status == 200 and body["throughput"]["events_total"].get("applied", 0) >= events

    wait_until(applied, what="the replayed purchases applied")
    # A population snapshot, so segments and grades have something to show.
    published = run_cli(env, "segments", "--publish", "--json")
    assert published.returncode == 0, published.stderr

    browser.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
    assert browser.title == "memberflow status"
    wait_for_text(browser, '#dist-tier tr[data-label="gold"] td.count', "1")
    wait_for_text(browser, '#dist-tier tr[data-label="silver"] td.count', "1")
    wait_for_text(browser, '#dist-tier tr[data-label="member"] td.count', "1")
    wait_for_text(browser, '#dist-tier tr[data-label="platinum"] td.count', "0")
    wait_for_text(browser, "#customers", "3")
    assert text(browser, "#connection") == "live"

    # It refreshes by itself: a new customer shows up without a reload.
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    late = tmp_path / "late.jsonl"
    late.write_text(
        json.dumps(
            {
                "event_id": "dave-0",
                "customer_id": "dave",
                "occurred_at": now,
                "amount": "15.00",
                "currency": "EUR",
            }
        )
        + "\n"
    )
    assert run_cli(env, "replay", "--quiet", str(late)).returncode == 0
    wait_for_text(browser, '#dist-tier tr[data-label="member"] td.count', "2")
    wait_for_text(browser, "#customers", "4")
    # the relabelling after the snapshot has reached the segment and grade tables
    wait_until(
        lambda: (
            sum(
                int(text(browser, f'#dist-grade tr[data-label="{grade}"] td.count') or 0)
                for grade in "ABC"
            )
            >= 3
        ),
        timeout=WAIT_S,
        what="grades on the page",
    )
    assert "tier upgraded" in text(browser, "#notifications")

    look_up(browser, "nobody")
    wait_for_text(browser, "#lookup-error", "404: no such customer: nobody")
    look_up(browser, "bad id!")
    wait_until(lambda: text(browser, "#lookup-error").startswith("400: invalid customer id"))
    look_up(browser, "alice")
    wait_for_text(browser, "#lookup-tier", "gold")
    assert text(browser, "#lookup-customer") == "alice"
    assert text(browser, "#lookup-lifecycle") == "active"
    assert "window_expiry" in text(browser, "#lookup-timers")

    # No script or CSP errors; the only failed requests are the two lookups meant to fail.
    severe = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE"
        and not (entry["source"] == "network" and "/customers/" in entry["message"])
    ]
    assert severe == []

    SCREENSHOT.parent.mkdir(exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, max(1000, int(height) + 40))
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
