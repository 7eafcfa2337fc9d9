"""End to end on a real broker and a real Redis: produce -> both consumers -> publish -> the
server swaps -> the ranking moved the way the events say it should."""

from __future__ import annotations

import random
import time

import pytest

from tests.conftest import produce, wait_for

pytestmark = pytest.mark.integration

N_ITEMS = 40
X, Y = "7", "3"  # the burst: users click X right after Y
BURST_USERS = 480


def rank_of(client, item: str, history: list[str]) -> tuple[int, int]:  # noqa: ANN001
    body = client.post("/recommend", json={"history": history, "k": N_ITEMS}).json()
    ids = [i["item_id"] for i in body["items"]]
    return ids.index(item) if item in ids else N_ITEMS, body["model_version"]


def test_stream_trains_publishes_swaps_and_moves_ranking(stack_env, spawn, monkeypatch) -> None:
    from starlette.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    env = stack_env
    rng = random.Random(0)
    items = [{"item_id": str(i), "text": f"movie {i} {rng.choice(['drama', 'comedy', 'noir'])}"}
             for i in range(N_ITEMS)]
    produce(env, "FRESHREC_TOPIC_ITEMS", items, "item_id")
    spawn("consumers.features", env)
    spawn("consumers.trainer", env)
    for k, v in env.items():
        if k.startswith("FRESHREC_"):
            monkeypatch.setenv(k, v)
    ts = 1_000_000.0
    background = []
    for n in range(300):  # random clicks, never X right after Y
        item = str(rng.choice([i for i in range(N_ITEMS) if str(i) not in (X, Y)]))
        background.append({"user_id": f"bg{n % 30}", "item_id": item, "event": "click",
                           "ts": ts + n})
    produce(env, "FRESHREC_TOPIC_INTERACTIONS", background, "user_id")

    with TestClient(create_app(ServiceSettings(poll_interval_s=0.2))) as client:
        wait_for(lambda: client.get("/recommend", params={"user_id": "bg1"}).json()
                 ["model_version"] > 0, 90, "a first served version")
        before, v1 = rank_of(client, X, [Y])
        # Small micro-batches learn at lr x n/256 (the same per event at any rate), so the burst
        # must carry as many events as a few full steps, not a few full-lr steps on 30 events
        burst = []
        for n in range(BURST_USERS):
            burst += [{"user_id": f"burst{n}", "item_id": Y, "ts": ts + 1000 + n},
                      {"user_id": f"burst{n}", "item_id": X, "ts": ts + 1000 + n + 0.5}]
        burst.append({"user_id": "probe", "item_id": Y, "ts": ts + 5000})
        for wave in range(0, len(burst), 120):  # a stream, not one batch: several AdamW steps
            produce(env, "FRESHREC_TOPIC_INTERACTIONS", burst[wave:wave + 120], "user_id")
            time.sleep(0.3)

        def trained_all() -> bool:
            model = client.get("/model").json()
            return sum(model["trained_through"].get("offsets", {}).values()) >= \
                300 + 2 * BURST_USERS + 1
        wait_for(trained_all, 60, "a served version trained through every event")
        after, v2 = rank_of(client, X, [Y])
        assert v2 > v1, "model_version must increase as new versions are served"
        assert after < before, f"X should rise after Y: rank {before} -> {after}"
        assert after <= 2, f"X should be near the top after Y, got rank {after}"

        rec = client.get("/recommend", params={"user_id": "probe", "k": 5}).json()
        assert rec["history_used"] == 1
        assert Y not in [i["item_id"] for i in rec["items"]], "seen items are excluded"
        assert X in [i["item_id"] for i in rec["items"]], rec
        assert rec["items"][0]["text"].startswith("movie ")
