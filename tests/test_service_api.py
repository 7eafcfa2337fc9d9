"""The HTTP API against a real Redis and a real, signed published version (no Kafka: the API
must start and serve without it). Invariant 5: bad input gets a clear 4xx, nothing crashes."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import redis
from helpers import (
    API_TOKEN,
    Publisher,
    client_for,
    make_events,
    make_items,
    metric_value,
    seed_features,
    settings,
    wait_until,
)

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
JSON = {"content-type": "application/json"}
MAX_BODY = 20_000


class Served:
    def __init__(self, client, pub: Publisher, fs, version: int) -> None:  # noqa: ANN001
        self.c, self.pub, self.fs, self.version = client, pub, fs, version


@pytest.fixture
def served(redis_url: str, namespace: str, tiny_encoder_path: str, tiny_encoder) -> Iterator[Served]:  # noqa: ANN001
    r = redis.Redis.from_url(redis_url)
    items = make_items(40)
    events = make_events(items, users=6, n=120)
    pub = Publisher(r, namespace, tiny_encoder_path, tiny_encoder, items, events)
    fs = seed_features(r, namespace, items, events)
    m = pub.publish()
    with client_for(settings(redis_url, namespace, tiny_encoder_path,
                             max_body_bytes=MAX_BODY)) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 10, "the first version")
        yield Served(c, pub, fs, m.version)


# ---------------------------------------------------------------------- GET /recommend
def test_recommend_known_user_excludes_seen(served: Served) -> None:
    hist, seen = served.fs.user_state("u1")
    assert hist and seen
    body = served.c.get("/recommend", params={"user_id": "u1", "k": 5}).json()
    assert len(body["items"]) == 5
    assert body["model_version"] == served.version
    assert body["history_used"] == min(len(hist), served.pub.cfg.history_len)
    assert body["source"] == "model" and body["stale_features"] is False
    assert body["user_id"] == "u1"
    assert not {i["item_id"] for i in body["items"]} & seen
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(i["text"] for i in body["items"])

    # the whole catalog: every unseen item once, and no seen one
    full = served.c.get("/recommend", params={"user_id": "u1", "k": 100}).json()
    ids = [i["item_id"] for i in full["items"]]
    assert len(ids) == len(set(ids)) == 40 - len(seen)
    assert not set(ids) & seen

    # exclude_seen=false brings them back
    incl = served.c.get("/recommend", params={"user_id": "u1", "k": 100,
                                              "exclude_seen": "false"}).json()
    assert {i["item_id"] for i in incl["items"]} == {it.item_id for it in served.pub.items}


def test_recommend_unknown_user_is_cold_start(served: Served) -> None:
    resp = served.c.get("/recommend", params={"user_id": "nobody-ever", "k": 7})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["items"]) == 7
    assert body["history_used"] == 0
    assert body["model_version"] == served.version and body["source"] == "model"


def test_recommend_sees_fresh_history_before_training(served: Served) -> None:
    """A click written by the features consumer changes the next answer (no new version)."""
    from model.events import Interaction

    before = served.c.get("/recommend", params={"user_id": "newbie", "k": 40}).json()
    first = before["items"][0]["item_id"]
    served.fs.apply([Interaction("newbie", first, time.time())])
    after = served.c.get("/recommend", params={"user_id": "newbie", "k": 40}).json()
    assert after["history_used"] == 1
    assert first not in {i["item_id"] for i in after["items"]}
    assert after["model_version"] == before["model_version"]


# ---------------------------------------------------------------------- POST /recommend
def test_post_recommend_with_history(served: Served) -> None:
    hist = ["i3", "i5", "i8"]
    body = served.c.post("/recommend", json={"history": hist, "k": 6, "exclude": ["i9"]}).json()
    ids = {i["item_id"] for i in body["items"]}
    assert len(ids) == 6
    assert body["history_used"] == 3 and body["user_id"] is None
    assert body["model_version"] == served.version
    assert not ids & {"i3", "i5", "i8", "i9"}

    keep = served.c.post("/recommend", json={"history": hist, "k": 40,
                                             "exclude_history": False}).json()
    assert set(hist) <= {i["item_id"] for i in keep["items"]}

    empty = served.c.post("/recommend", json={}).json()  # all defaults: anonymous cold start
    assert len(empty["items"]) == 10 and empty["history_used"] == 0


def test_post_recommend_unknown_item_ids(served: Served) -> None:
    resp = served.c.post("/recommend", json={"history": ["i1", "no-such-item", "ghost"]})
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and "unknown item" in detail
    assert "no-such-item" in detail and "ghost" in detail


# ---------------------------------------------------------------------- bounds and bad input
def test_k_out_of_range(served: Served) -> None:
    for k in (0, -1, 101, 1000):
        get = served.c.get("/recommend", params={"user_id": "u1", "k": k})
        post = served.c.post("/recommend", json={"history": ["i1"], "k": k})
        for resp in (get, post):
            assert resp.status_code == 422, (k, resp.text)
            assert any("k" in e["loc"] for e in resp.json()["detail"])


def test_malformed_json(served: Served) -> None:
    for raw in (b'{"history": [', b"not json", b'{"history": "i1"}', b"[1, 2]",
                b'{"history": ["i1"], "k": "ten"}'):
        resp = served.c.post("/recommend", content=raw, headers=JSON)
        assert resp.status_code == 422, (raw, resp.status_code, resp.text)
        assert resp.json()["detail"]
    bad = served.c.post("/events", content=b'{"user_id": "u", ', headers={**JSON, **AUTH})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["type"] == "json_invalid"
    assert served.c.get("/healthz").status_code == 200  # nothing crashed


BAD_EVENTS = [
    b'{"user_id":"u","item_id":"i","ts":NaN}',
    b'{"user_id":"u","item_id":"i","ts":Infinity}',
    b'{"user_id":"u","item_id":"i","ts":-Infinity}',
    b'{"user_id":"u","item_id":"i","ts":-5}',
    b'[{"user_id":"u","item_id":"i","ts":1.0},{"user_id":"u","item_id":"i","ts":NaN}]',
    b'{"user_id":"","item_id":"i","ts":1.0}',
    b'{"item_id":"i","ts":1.0}',
    b'{"user_id":"u","item_id":"i","ts":"yesterday"}',
    b"[]",
]


def test_bad_events_are_422_even_with_kafka_down(served: Served) -> None:
    """Validation comes before any Kafka connection: bad input is the client's 4xx, not a 503
    (and a NaN echoed back in the error is not a 500)."""
    for raw in BAD_EVENTS:
        t0 = time.monotonic()
        resp = served.c.post("/events", content=raw, headers={**JSON, **AUTH})
        assert resp.status_code == 422, (raw, resp.status_code, resp.text)
        detail = resp.json()["detail"]
        assert detail, raw
        if b"NaN" in raw or b"Infinity" in raw:  # says what is wrong, and where
            assert any("finite" in e["msg"] and e["loc"][-1] == "ts" for e in detail), detail
        assert time.monotonic() - t0 < 2.0, raw


def test_huge_strings(served: Served) -> None:
    huge = "x" * 10_000
    assert served.c.get("/recommend", params={"user_id": huge}).status_code == 422
    ev = served.c.post("/events", json={"user_id": huge, "item_id": "i1", "ts": 1.0},
                       headers=AUTH)
    assert ev.status_code == 422
    assert ev.json()["detail"][0]["loc"][-1] == "user_id"
    ev2 = served.c.post("/events", json={"user_id": "u", "item_id": "i", "ts": 1.0,
                                         "event": "e" * 1000}, headers=AUTH)
    assert ev2.status_code == 422
    rec = served.c.post("/recommend", json={"history": [huge]})
    assert rec.status_code == 422
    long_hist = served.c.post("/recommend", json={"history": ["i1"] * 201})
    assert long_hist.status_code == 422


def test_body_over_limit_is_413(served: Served) -> None:
    big = b'{"history": [' + b'"i1",' * (MAX_BODY // 5) + b'"i1"]}'
    assert len(big) > MAX_BODY
    resp = served.c.post("/recommend", content=big, headers=JSON)  # with Content-Length
    assert resp.status_code == 413
    assert str(MAX_BODY) in resp.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for k in range(0, len(big), 4096):
            yield big[k: k + 4096]

    resp = served.c.post("/recommend", content=chunks(), headers=JSON)
    assert "content-length" not in resp.request.headers
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert resp.status_code == 413, resp.text
    assert str(MAX_BODY) in resp.json()["detail"]

    ev = served.c.post("/events", content=chunks(), headers={**JSON, **AUTH})
    assert ev.status_code == 413

    # a small chunked body is still fine
    small = served.c.post("/recommend", content=iter([b'{"history": ["i1"],', b' "k": 3}']),
                          headers=JSON)
    assert small.status_code == 200 and len(small.json()["items"]) == 3


# ---------------------------------------------------------------------- write endpoints
def test_events_need_the_token(served: Served) -> None:
    ok = {"user_id": "u", "item_id": "i1", "ts": 1.0}
    none = served.c.post("/events", json=ok)
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    wrong = served.c.post("/events", json=ok, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    not_bearer = served.c.post("/events", json=ok, headers={"Authorization": API_TOKEN + "x"})
    assert not_bearer.status_code == 401
    items = served.c.post("/items", json={"item_id": "x", "text": "t"})
    assert items.status_code == 401


def test_write_endpoints_disabled_without_token(redis_url: str, namespace: str,
                                                 tiny_encoder_path: str) -> None:
    with client_for(settings(redis_url, namespace, tiny_encoder_path, api_token="")) as c:
        ok = {"user_id": "u", "item_id": "i1", "ts": 1.0}
        for headers in ({}, {"Authorization": "Bearer "}, AUTH):
            resp = c.post("/events", json=ok, headers=headers)
            assert resp.status_code == 503
            assert "FRESHREC_API_TOKEN" in resp.json()["detail"]


def test_events_with_kafka_unreachable_is_503(served: Served) -> None:
    ok = {"user_id": "u", "item_id": "i1", "ts": 1.0, "extra": "kept"}
    t0 = time.monotonic()
    resp = served.c.post("/events", json=ok, headers=AUTH)
    first = time.monotonic() - t0
    assert resp.status_code == 503
    assert "Kafka is unavailable" in resp.json()["detail"]
    assert first < 10.0, f"the first 503 took {first:.1f} s"
    # while Kafka is known to be down, writes fail fast instead of pinning worker threads
    t0 = time.monotonic()
    again = served.c.post("/events", json=[ok, ok], headers=AUTH)
    assert again.status_code == 503 and "Kafka is unavailable" in again.json()["detail"]
    assert "retry-after" in again.headers
    items = served.c.post("/items", json={"item_id": "x", "text": "t"}, headers=AUTH)
    assert items.status_code == 503
    assert time.monotonic() - t0 < 1.0
    # and reads are unaffected
    assert served.c.get("/recommend", params={"user_id": "u1"}).status_code == 200


# ---------------------------------------------------------------------- probes and metrics
def test_health_ready_and_model(redis_url: str, namespace: str, tiny_encoder_path: str,
                                tiny_encoder) -> None:  # noqa: ANN001
    r = redis.Redis.from_url(redis_url)
    items = make_items(20)
    events = make_events(items, users=3, n=40)
    with client_for(settings(redis_url, namespace, tiny_encoder_path)) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "model_version": 0, "redis_ok": True}
        model = c.get("/model").json()
        assert model["version"] == 0 and model["swaps"] == 0 and model["parent"] is None
        # before any version: popularity, still 200
        seed_features(r, namespace, items, events)
        pop = c.get("/recommend", params={"user_id": "u0", "k": 3})
        assert pop.status_code == 200 and pop.json()["source"] == "popularity"
        assert pop.json()["model_version"] == 0

        pub = Publisher(r, namespace, tiny_encoder_path, tiny_encoder, items, events)
        m = pub.publish()
        wait_until(lambda: c.get("/readyz").status_code == 200, 10, "readiness")
        assert c.get("/readyz").json() == {"ready": True, "model_version": m.version,
                                          "redis_ok": True}
        model = c.get("/model").json()
        assert model["version"] == m.version and model["kind"] == "full"
        assert model["parent"] is None and model["swaps"] == 1
        assert model["encoder"] == tiny_encoder.identity
        assert model["created_at"] == pytest.approx(m.created_at)
        assert 0 <= model["age_seconds"] < 30
        assert model["trained_through"] == m.trained_through
        assert model["catalog_items"] == 20 and model["refused_versions"] == {}

        pub.learn(make_events(items, users=3, n=20, seed=5))
        m2 = pub.publish(kind="delta")
        wait_until(lambda: c.get("/model").json()["version"] == m2.version, 10, "the delta")
        model = c.get("/model").json()
        assert model["kind"] == "delta" and model["parent"] == m.version and model["swaps"] == 2


def test_metrics(served: Served) -> None:
    served.c.get("/recommend", params={"user_id": "u1"})
    served.c.post("/recommend", json={"history": ["i1"]})
    served.c.get("/recommend", params={"user_id": "u1", "k": 0})
    resp = served.c.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert metric_value(text, "freshrec_model_version") == served.version
    for route, method, status in (("/recommend", "GET", "200"), ("/recommend", "POST", "200"),
                                  ("/recommend", "GET", "422")):
        assert metric_value(text, "freshrec_http_request_duration_seconds_count",
                            {"route": route, "method": method, "status": status}) >= 1
    assert 'freshrec_http_request_duration_seconds_bucket{le="0.005",method="GET",' \
           'route="/recommend",status="200"}' in text
    assert "freshrec_model_swaps_total" in text
    assert "freshrec_http_requests_in_flight" in text
    assert "freshrec_model_age_seconds" in text
    # the route label is a route template (bounded cardinality), never a raw path or query
    served.c.get("/recommend/u1-not-a-route")  # a 404 must not mint a label per raw path
    text = served.c.get("/metrics").text
    labels = set(re.findall(r'freshrec_http_request_duration_seconds_count\{[^}]*route="([^"]*)"',
                            text))
    assert {"/recommend", "/metrics"} <= labels, labels
    assert not [x for x in labels if "?" in x or "u1" in x], labels
    # the collector's pauses, timed while the server runs (each holds the GIL: requests wait)
    import gc

    before = metric_value(text, "freshrec_gc_pause_seconds_count", {"generation": "2"})
    gc.collect()
    text = served.c.get("/metrics").text
    assert metric_value(text, "freshrec_gc_pause_seconds_count", {"generation": "2"}) >= before + 1


def test_dependencies_take_no_thread_pool_round_trip() -> None:
    """FastAPI runs a plain `def` dependency on its thread pool, one hand-off each: /recommend's
    six dependencies cost six before the route's own (the event loop held the GIL 57% of the
    time at 200 req/s, 100k items, 2026-12-01). They only read app state: `async def`."""
    import inspect

    from fastapi.routing import APIRoute

    from service.routes import router

    def calls(dependant) -> Iterator:  # noqa: ANN001 - fastapi's Dependant
        for dep in dependant.dependencies:
            yield dep.call
            yield from calls(dep)

    checked = 0
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path in ("/recommend", "/events", "/items"):
            for call in calls(route.dependant):
                checked += 1
                assert inspect.iscoroutinefunction(call), f"{route.path}: {call.__name__}"
    assert checked >= 10


def test_gil_switch_interval_is_the_servers_while_it_runs(redis_url: str, namespace: str,
                                                          tiny_encoder_path: str) -> None:
    """FRESHREC_GIL_SWITCH_MS is applied for the server's lifetime and put back after it (the
    interval is process-wide: tests and embedding programs run more than one app)."""
    import sys

    before = sys.getswitchinterval()
    with client_for(settings(redis_url, namespace, tiny_encoder_path, gil_switch_ms=0.5)) as c:
        assert c.get("/healthz").status_code in (200, 503)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == pytest.approx(before)
    with pytest.raises(ValueError, match="gil_switch_ms"):
        settings(redis_url, namespace, tiny_encoder_path, gil_switch_ms=0)
