"""The status page at `/`, in a real headless Chromium against a real uvicorn process and Redis.

Versions are published while the page is open, so the test sees the page follow them (live
values, the HR@10 chart growing), then asks for a user's recommendations and reads the item
texts off the page. Skipped only when Chromium and its driver are not installed
(scripts/install_browser.sh installs Debian's `chromium` and `chromium-driver`).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pytest
import redis

from tests.api_server import ApiServer, get, get_json
from tests.conftest import ROOT, wait_for
from tests.helpers import HMAC_KEY, Publisher, make_events, make_items, seed_features

SCREENSHOT = ROOT / "docs" / "status-page.png"
HR = [0.12, 0.15, 0.19, 0.18, 0.23, 0.26]  # online HR@10 of the versions published in turn


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium / chromedriver not installed (scripts/install_browser.sh)")
    return browser, driver


@pytest.fixture
def api(redis_url: str, namespace: str, tiny_encoder_path: str, tmp_path: Path):  # noqa: ANN201
    """uvicorn, started first: it imports torch while the browser starts and the test seeds."""
    env = {**os.environ, "FRESHREC_REDIS_URL": redis_url, "FRESHREC_NAMESPACE": namespace,
           "FRESHREC_HMAC_KEY": HMAC_KEY, "FRESHREC_ENCODER_PATH": tiny_encoder_path,
           "FRESHREC_POLL_INTERVAL_S": "0.2", "FRESHREC_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    server = ApiServer(env, tmp_path / "api.log")
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path: Path):  # noqa: ANN201 - a selenium WebDriver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager go online
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1200,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver,
                                                         log_output=str(tmp_path / "driver.log")))
    drv.set_page_load_timeout(20)
    yield drv
    drv.quit()


def publish(pub: Publisher, hr: float, n: int) -> int:
    """A real, signed version whose trained-through data carries the trainer's live numbers."""
    now = time.time()
    m = pub.store.publish(
        pub.blob(), parent=None, kind="full", config=asdict(pub.cfg),
        encoder=pub.learner.encoder.identity,
        trained_through={"produced_ts": [now - 0.9, now - 0.6, now - 0.3], "events": 120 + n,
                         "events_per_s": 240.0 + 10 * n, "online_hr@10": hr,
                         "online_ndcg@10": hr / 2, "holdout_hr@10": hr - 0.01, "dlq": 3})
    return m.version


def test_histogram_quantile_estimates_like_promql() -> None:
    from prometheus_client import Histogram

    from service.metrics import histogram_count, histogram_quantile

    h = Histogram("t_seconds", "test", buckets=(1, 2, 5), registry=None)
    assert histogram_quantile(0.5, h) is None and histogram_count(h) == 0
    for v in (0.5, 1.5, 1.5, 3):
        h.observe(v)
    assert histogram_quantile(0.5, h) == pytest.approx(1.5)  # rank 2 of 4, halfway into (1, 2]
    assert histogram_quantile(0.99, h) == pytest.approx(2 + 3 * 0.96)
    assert histogram_quantile(0.1, h) == pytest.approx(0.4)  # the first bucket starts at 0
    h.observe(60)
    assert histogram_quantile(0.99, h) == 5  # in +Inf: the highest finite bound, as PromQL
    assert histogram_count(h) == 5


@pytest.mark.integration
def test_status_page_renders_live_values_and_recommendations(
        api: ApiServer, browser, redis_url: str, namespace: str, tiny_encoder_path: str,
        tiny_encoder, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    client = redis.Redis.from_url(redis_url)
    items = make_items(30)
    events = make_events(items, users=6, n=80)
    seed_features(client, namespace, items, events)
    pub = Publisher(client, namespace, tiny_encoder_path, encoder=tiny_encoder, items=items,
                    events=events)
    api.wait_ready()
    status, html = get(f"{api.base}/")
    assert status == 200 and b"/static/status.js" in html
    for asset in ("status.js", "status.css"):
        assert get(f"{api.base}/static/{asset}")[0] == 200
    assert not re.search(rb'(src|href)="(https?:)?//', html), "nothing from elsewhere"

    browser.get(api.base + "/")
    text = lambda el_id: browser.find_element(By.ID, el_id).text  # noqa: E731
    assert wait_for(lambda: "live" in text("conn"), 15, "the page's first /status poll")
    assert text("version") == "none yet"

    # The page must follow new versions on its own: the first, then the last of a burst.
    versions = [publish(pub, HR[0], 0)]
    wait_for(lambda: text("version") == f"v{versions[-1]}", 15, "the page to show v1")
    for n, hr in enumerate(HR[1:], 1):
        time.sleep(0.6)
        versions.append(publish(pub, hr, n))
    wait_for(lambda: text("version") == f"v{versions[-1]}", 15,
             f"the page to show v{versions[-1]}")
    served = get_json(f"{api.base}/status")
    assert served["version"] == versions[-1]
    assert text("version") == f"v{served['version']}", "the page shows the served version"
    assert served["freshness_seconds"]["count"] >= 6  # 3 per version; it may skip a few
    wait_for(lambda: text("fresh-p50") not in ("", "\u2013"), 10, "freshness on the page")
    assert text("fresh-p50").endswith(" s") and text("fresh-p99").endswith(" s")
    assert int(text("fresh-count")) >= 6
    assert text("online-hr") == f"{HR[-1]:.3f}"
    assert text("events-per-s") == f"{240 + 10 * (len(HR) - 1)}"
    assert text("dlq") == "3"
    assert int(text("swaps")) >= 1
    assert text("catalog") == str(len(items))
    points = wait_for(lambda: int(browser.find_element(By.ID, "hr-chart")
                                  .get_attribute("data-points") or 0) >= 3,
                      10, "the HR@10 chart to accumulate points")
    assert points
    assert browser.find_elements(By.CSS_SELECTOR, "#hr-chart polyline")

    user = events[-1].user_id
    box = browser.find_element(By.ID, "user-id")
    box.clear()
    box.send_keys(user)
    browser.find_element(By.ID, "ask").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#recs .rec-text"), 15,
             "recommendations on the page")
    shown = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "#recs .rec-text")]
    texts = {i.text for i in items}
    assert len(shown) == 10 and set(shown) <= texts, shown
    expected = get_json(f"{api.base}/recommend?user_id={user}&k=10")
    assert shown == [i["text"] for i in expected["items"]]
    assert f"model v{versions[-1]}" in text("rec-meta")

    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot))
    # docs/status-page.png is the README's picture: written when missing, refreshed on
    # request (FRESHREC_UPDATE_SCREENSHOT=1), so ordinary test runs leave the tree clean.
    if not SCREENSHOT.exists() or os.environ.get("FRESHREC_UPDATE_SCREENSHOT") == "1":
        tmp = SCREENSHOT.with_name(f".{uuid.uuid4().hex}.png")
        shutil.copyfile(shot, tmp)
        tmp.replace(SCREENSHOT)
