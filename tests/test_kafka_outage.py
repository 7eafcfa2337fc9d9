"""Issue 9, #8: the broker dies after the API connected to it.

While it is down, POST /events answers 503 within about a second (it used to block ~5-10 s per
request in the thread pool that /recommend shares), /recommend is unaffected, and writes are
accepted again by themselves once the broker is back. A real Tansu broker is started for this
test alone, killed with SIGKILL and restarted on the same port.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import free_port
from helpers import (
    API_TOKEN,
    client_for,
    publish_small,
    settings,
    wait_until,
)

from freshrec.services import start_tansu
from protocol.topics import ensure_topics

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def test_events_answer_503_fast_while_the_broker_is_down(
        redis_url: str, namespace: str, tiny_encoder_path: str, tiny_encoder,  # noqa: ANN001
        tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    publish_small(r, namespace, tiny_encoder_path, tiny_encoder)
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topics = [f"{namespace}.interactions", f"{namespace}.items", f"{namespace}.dlq"]
    broker = start_tansu(port, tmp_path / "tansu.log")
    try:
        ensure_topics(bootstrap, topics, 1)
        s = settings(redis_url, namespace, tiny_encoder_path, kafka_bootstrap=bootstrap,
                     topic_interactions=topics[0], topic_items=topics[1], topic_dlq=topics[2])
        event = {"user_id": "u1", "item_id": "i1", "ts": 1.0}
        with client_for(s) as c:
            wait_until(lambda: c.get("/readyz").status_code == 200, 10, "the first version")
            assert c.post("/events", json=event, headers=AUTH).status_code == 202

            broker.kill()  # SIGKILL: the producer's connection just goes away
            broker.wait()
            writes: list[tuple[int, float]] = []

            def writer() -> None:
                for _ in range(4):
                    t0 = time.monotonic()
                    code = c.post("/events", json=event, headers=AUTH).status_code
                    writes.append((code, time.monotonic() - t0))

            threads = [threading.Thread(target=writer) for _ in range(8)]
            for t in threads:
                t.start()
            slowest_read = 0.0
            while any(t.is_alive() for t in threads):
                t0 = time.monotonic()
                assert c.get("/recommend", params={"user_id": "u1"}).status_code == 200
                slowest_read = max(slowest_read, time.monotonic() - t0)
                time.sleep(0.05)
            for t in threads:
                t.join()
            assert {code for code, _ in writes} == {503}, writes
            slowest_write = max(took for _, took in writes)
            assert slowest_write < 1.5, f"a write took {slowest_write:.1f} s to answer 503"
            assert slowest_read < 1.0, f"a read took {slowest_read:.1f} s while Kafka was down"

            broker = start_tansu(port, tmp_path / "tansu.log")  # memory storage: topics anew
            ensure_topics(bootstrap, topics, 1)
            wait_until(lambda: c.post("/events", json=event, headers=AUTH).status_code == 202,
                       20, "writes accepted again after the broker returned", interval=0.5)
    finally:
        if broker.poll() is None:
            broker.kill()
        broker.wait()
