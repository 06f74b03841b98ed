"""The dashboard in a real browser: Debian's headless chromium driven by selenium, against a real
`sitebench qc serve` filled by real uploads of the shared GE T1 (one series with a wrong flip angle,
so it fails). The whole query loop: the monitor signs in, sees the failed series, opens the query;
the site coordinator signs in and answers; the monitor closes it. Each page is saved as a
screenshot and checked not to be blank; site scoping is checked in the browser and in the audit."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
import requests
from test_qc_queries import queries, upload, user, wait_for, wrong_flip_angle
from test_qc_stow import T1, Service

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom"),
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromium-driver (./run installs them)")]


@pytest.fixture(scope="module")
def protocols(t1_protocols):
    return t1_protocols


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=DriverService(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def not_blank(png: Path) -> bool:
    """A screenshot with content: many distinct colours and real contrast, not one flat fill."""
    import numpy as np
    from matplotlib.image import imread

    pixels = imread(str(png))[..., :3]
    flat = (pixels.reshape(-1, 3) * 255).astype(int)
    return float(pixels.std()) > 0.05 and len({tuple(p) for p in flat[:: max(1, len(flat) // 20000)]}) > 20 \
        and np.ptp(pixels) > 0.5


def test_the_query_loop_in_a_browser(tmp_path, protocols, browser):
    from selenium.webdriver.common.by import By

    svc = Service(tmp_path, protocols, http={"max_requests_per_minute": 100000}, quiet_seconds=1.0)
    tokens = {"up": user(svc, "up-s01", "site_uploader", "S01"),
              "coord": user(svc, "coord-s01", "site_coordinator", "S01"),
              "monitor": user(svc, "monitor", "central_monitor")}
    svc.start()
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        path = shots / f"{name}.png"
        browser.save_screenshot(str(path))
        assert not_blank(path), f"{name}: blank screenshot"

    def click(element) -> None:
        """Click and wait for the next page (the clicked element goes stale)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def gone(_driver) -> bool:
            try:
                element.is_enabled()
            except WebDriverException:  # stale, or (chromium) "node does not belong to the document"
                return True
            return False

        element.click()
        WebDriverWait(browser, 15).until(gone)

    def sign_in(token: str) -> None:
        browser.get(f"{svc.url}/login")
        browser.find_element(By.ID, "token").send_keys(token)
        click(browser.find_element(By.ID, "sign-in"))

    def sign_out() -> None:
        click(browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] button"))

    try:
        # every page needs a session; without one the browser is sent to sign in
        assert requests.get(f"{svc.url}/sites/S01", allow_redirects=False, timeout=10).status_code == 303
        upload(svc, "S01", wrong_flip_angle(tmp_path / "fa25"), tokens["up"])
        (draft,) = wait_for(lambda: queries(svc, tokens["monitor"], "list").get("queries"))

        # 1. the monitor signs in and sees the failed series
        browser.get(f"{svc.url}/login")
        shot("01-sign-in")
        sign_in("sbk_not-a-token")
        assert "not valid" in browser.find_element(By.ID, "error").text
        sign_in(tokens["monitor"])
        row = browser.find_element(By.XPATH, "//table[@id='sites']//tr[td/a[text()='S01']]")
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells[4] == "1" and cells[6] == "0", cells  # one fail; its query is a draft, not open yet
        header = [c.text for c in browser.find_elements(By.XPATH, "//table[@id='sites']//th")]
        uploaded = cells[header.index("Last upload (UTC)")]
        age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(uploaded).replace(tzinfo=dt.timezone.utc)
        assert dt.timedelta(0) <= age < dt.timedelta(minutes=10), cells  # the upload just made
        shot("02-overview")
        click(browser.find_element(By.LINK_TEXT, "S01"))
        assert browser.find_element(By.TAG_NAME, "svg")  # the time axis
        shot("03-site")
        click(browser.find_element(By.LINK_TEXT, draft["series_key"][:12]))
        assert browser.find_element(By.ID, "verdict").text == "fail"
        deviations = browser.find_element(By.ID, "deviations").text
        assert "FlipAngle" in deviations and "25" in deviations
        assert browser.execute_script("return document.getElementById('montage').naturalWidth") >= 4 * 100  # loaded
        shot("04-series")
        # 2. the monitor opens the query
        click(browser.find_element(By.ID, "query-link"))
        browser.find_element(By.ID, "open-note").send_keys("Please re-scan at the next visit or explain.")
        click(browser.find_element(By.ID, "open-query"))
        assert browser.find_element(By.ID, "query-status").text == "open"
        shot("05-query-opened")
        sign_out()

        # 3. the site coordinator signs in (lands on their site) and answers it
        sign_in(tokens["coord"])
        assert browser.current_url.endswith("/sites/S01")
        browser.get(f"{svc.url}/sites/S02")  # another site's page: refused
        assert "Not allowed" in browser.page_source
        browser.get(f"{svc.url}/")  # the trial overview: a site's user is sent to their own site instead
        assert browser.current_url.endswith("/sites/S01") and "Site S02" not in browser.page_source
        browser.get(f"{svc.url}/queries/{draft['id']}")
        assert not browser.find_elements(By.ID, "accept-query")  # a coordinator cannot close it
        browser.find_element(By.ID, "kind-explanation").click()
        browser.find_element(By.ID, "answer-text").send_keys("Old protocol loaded by mistake; technologist retrained.")
        click(browser.find_element(By.ID, "answer-query"))
        assert browser.find_element(By.ID, "query-status").text == "answered"
        shot("06-query-answered")
        sign_out()

        # 4. the monitor closes it
        sign_in(tokens["monitor"])
        browser.get(f"{svc.url}/queries/{draft['id']}")
        browser.find_element(By.ID, "accept-note").send_keys("Accepted.")
        click(browser.find_element(By.ID, "accept-query"))
        assert browser.find_element(By.ID, "query-status").text == "closed"
        steps = browser.find_element(By.ID, "steps").text
        assert all(word in steps for word in ("drafted", "opened", "answered", "accepted", "coord-s01"))
        shot("07-query-closed")

        trail = svc.audit()
        refused = [r for r in trail if r["what"] == "access refused" and r["details"]["user"] == "coord-s01"]
        assert "site page S02" in {r["subject"] for r in refused}
        assert [r["details"]["user"] for r in trail if r["what"] == "sign-in"] == ["monitor", "coord-s01", "monitor"]
        assert any(r["what"] == "access refused" and r["subject"] == "dashboard sign-in" for r in trail)
        # a form posted without the session's CSRF token changes nothing
        cookie = {c["name"]: c["value"] for c in browser.get_cookies()}
        forged = requests.post(f"{svc.url}/queries/{draft['id']}/send-back", data={"text": "x"}, cookies=cookie,
                               timeout=10)
        assert forged.status_code == 403
        assert len(list(shots.glob("*.png"))) == 7
    finally:
        svc.stop()
