"""The status page in a real browser against a real cluster: Debian's chromium, headless, driven
by selenium through Debian's chromedriver (no browser is downloaded). Four `pst serve` processes
from `pst cluster init` / `pst cluster up --detach`; the page of server 1 shows the four
servers operational, then server 4 is stopped (kill of its pid) and the page shows it down
without being reloaded. Screenshots of both go to the test's tmp dir."""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterutil import running_cluster

from appliance.host import config as node_config

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1500,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # 503 while not operational yet: it answers
        return True
    except OSError:
        return False


def rows(driver: Any) -> dict[int, tuple[str, str]]:
    """Server -> (data-state, text) of each row of the page's servers table."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    out = {}
    try:
        for tr in driver.find_elements(By.CSS_SELECTOR, "#servers tbody tr"):
            out[int(tr.get_attribute("data-server"))] = (tr.get_attribute("data-state"), tr.text)
    except StaleElementReferenceException:  # the page re-rendered the table meanwhile
        return {}
    return out


def test_the_page_shows_all_servers_and_a_stopped_one_as_down(tmp_path: Path, browser: Any) -> None:
    with running_cluster(tmp_path / "c", n=4, period=4, round_ms=80) as root:
        url = node_config.load(root / "node-1" / "config.toml").http.url + "/"
        wait_for(lambda: answers(url + "v1/health"), 30, "server 1's HTTP service")  # it starts last
        browser.get(url)
        assert browser.title == "pst: PServer network"
        wait_for(
            lambda: {s for s, _ in rows(browser).values()} == {"operational"} and len(rows(browser)) == 4,
            90,
            "four operational servers on the page",
        )
        # Let a few refreshes happen, so that the timeline has something to show.
        wait_for(lambda: "period 3:" in browser.page_source, 60, "the refresh of period 3")
        seen = rows(browser)
        assert sorted(seen) == [1, 2, 3, 4]
        assert "server 1 (this one)" in seen[1][1]
        summary = browser.find_element("id", "summary").text
        assert "4 operational" in summary and "members 1, 2, 3, 4" in summary
        browser.save_screenshot(str(tmp_path / "status-page.png"))

        pid = int((root / "node-4" / "server.pid").read_text())
        os.kill(pid, signal.SIGTERM)  # stop server 4 (`kill PID`)

        def shown_down() -> bool:
            state, text = rows(browser).get(4, ("", ""))
            return state == "stopped" and "stopped (down)" in text and "no answer from" in text

        wait_for(shown_down, 30, "server 4 shown as stopped (down), with the reason")
        wait_for(
            lambda: {s for i, (s, _) in rows(browser).items() if i != 4} == {"operational"},
            30,
            "the three others operational",
        )
        assert "3 operational, 1 stopped" in browser.find_element("id", "summary").text
        browser.save_screenshot(str(tmp_path / "status-page-one-down.png"))
    for name in ("status-page.png", "status-page-one-down.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    keep = os.environ.get("PST_SCREENSHOT_DIR")  # to refresh docs/status-page.png by hand
    if keep:
        shutil.copy(tmp_path / "status-page-one-down.png", Path(keep) / "status-page.png")
