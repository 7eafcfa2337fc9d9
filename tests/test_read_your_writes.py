"""Read-your-writes: an event this API accepted shapes the user's next ranking at once, before
the features consumer has applied it to Redis (it applies it milliseconds later; a ranking asked
for in between used to miss the user's newest item). No features consumer runs here, so Redis
only learns of the event when the test applies it."""

from __future__ import annotations

import time

import pytest
import redis
from helpers import (
    API_TOKEN,
    Publisher,
    client_for,
    make_events,
    make_items,
    seed_features,
    settings,
)

from model.events import Interaction
from protocol.topics import ensure_topics

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def test_accepted_events_shape_the_next_ranking_until_redis_has_them(
        redis_url: str, namespace: str, kafka_bootstrap: str, tiny_encoder_path: str,
        tiny_encoder) -> None:  # noqa: ANN001
    r = redis.Redis.from_url(redis_url)
    items = make_items(20)
    events = make_events(items, users=3, n=30)
    Publisher(r, namespace, tiny_encoder_path, tiny_encoder, items, events).publish()
    features = seed_features(r, namespace, items, [])
    ensure_topics(kafka_bootstrap, [f"{namespace}.interactions", f"{namespace}.items",
                                    f"{namespace}.dlq"], 1)
    s = settings(redis_url, namespace, tiny_encoder_path, kafka_bootstrap=kafka_bootstrap,
                 topic_interactions=f"{namespace}.interactions", recent_events_s=1.0)
    with client_for(s) as client:
        def ranked(user: str) -> dict:
            return client.get("/recommend", params={"user_id": user, "k": 20}).json()

        assert ranked("fresh")["history_used"] == 0
        first, second = items[3].item_id, items[5].item_id
        for item in (first, second):
            body = {"user_id": "fresh", "item_id": item, "event": "click", "ts": 1.0}
            assert client.post("/events", json=body, headers=AUTH).status_code == 202
        now = ranked("fresh")
        assert now["history_used"] == 2, "accepted events count before Redis has them"
        assert not {first, second} & {i["item_id"] for i in now["items"]}, "and are excluded"
        features.apply([Interaction("fresh", first, 1.0)])  # the consumer catches up (partly)
        assert ranked("fresh")["history_used"] == 2, "an applied event is not counted twice"
        features.apply([Interaction("fresh", second, 1.0)])
        assert ranked("fresh")["history_used"] == 2
        time.sleep(1.1)  # past recent_events_s: Redis alone speaks
        assert ranked("fresh")["history_used"] == 2
        assert ranked("other")["history_used"] == 0, "one user's events are not another's"
