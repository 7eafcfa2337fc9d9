"""Invariant 5 on the stream: a malformed record goes to the DLQ with headers naming where it
came from and why, and later good records on the same partition still flow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from consumers.loop import Transport
from consumers.settings import FeaturesSettings
from freshrec.services import start_tansu
from protocol.features import FeatureStore
from protocol.topics import ensure_topics
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.integration

BAD = [b"{not json", json.dumps({"user_id": "u1", "item_id": "i1", "ts": "yesterday"}).encode(),
       json.dumps({"user_id": "u1", "ts": 5}).encode(), b"[1, 2, 3]"]


def test_malformed_events_go_to_dlq_and_partition_keeps_flowing(stack_env, spawn) -> None:
    env = stack_env
    prod = KafkaProducer(bootstrap_servers=env["FRESHREC_KAFKA_BOOTSTRAP"])
    topic = env["FRESHREC_TOPIC_INTERACTIONS"]
    good = lambda n: json.dumps({"user_id": "u1", "item_id": f"i{n}", "ts": n}).encode()  # noqa: E731
    prod.send(topic, key=b"u1", value=good(0), partition=0)
    for raw in BAD:  # same key, same partition: they sit between good records
        prod.send(topic, key=b"u1", value=raw, partition=0)
    for n in range(1, 4):
        prod.send(topic, key=b"u1", value=good(n), partition=0)
    prod.flush()
    spawn("consumers.features", env)

    store = FeatureStore(redis.Redis.from_url(env["FRESHREC_REDIS_URL"]), env["FRESHREC_NAMESPACE"])
    wait_for(lambda: store.user_state("u1")[0] == ["i0", "i1", "i2", "i3"], 60,
             "the good events around the bad ones in the user's history")

    dlq = KafkaConsumer(bootstrap_servers=env["FRESHREC_KAFKA_BOOTSTRAP"],
                        auto_offset_reset="earliest", consumer_timeout_ms=20_000)
    parts = wait_for(lambda: dlq.partitions_for_topic(env["FRESHREC_TOPIC_DLQ"]), 20, "DLQ topic")
    dlq.assign([TopicPartition(env["FRESHREC_TOPIC_DLQ"], p) for p in sorted(parts)])
    dead = []
    for rec in dlq:
        dead.append(rec)
        if len(dead) == len(BAD):
            break
    dlq.close()
    assert [r.value for r in dead] == BAD, "DLQ records keep the original bytes, in order"
    for rec in dead:
        headers = {k: v.decode() for k, v in rec.headers}
        assert headers["source_topic"] == topic
        assert headers["source_partition"] == "0"
        assert int(headers["source_offset"]) in range(1, 1 + len(BAD))
        assert headers["error"] and headers["error_reason"] in ("bad_json", "bad_field")
        assert rec.key == b"u1"


def test_a_failed_dlq_write_is_not_committed_past(tmp_path: Path, namespace: str) -> None:
    """Issue 9, #6: the broker restarts under a connected features transport (memory storage:
    it forgets the DLQ producer's id, so that producer's next writes fail). A bad record
    polled then must not be committed past until it is really in the DLQ."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    s = FeaturesSettings(kafka_bootstrap=bootstrap, topic_interactions=f"{namespace}.i",
                         topic_items=f"{namespace}.it", topic_dlq=f"{namespace}.dlq",
                         partitions=1, features_group=f"{namespace}-features")
    topics = [s.topic_interactions, s.topic_items, s.topic_dlq]
    broker = start_tansu(port, tmp_path / "tansu.log")
    transport = None
    try:
        transport = Transport(s, s.features_group, "features", dlq=True)
        assert transport.producer is not None
        transport.producer.send(s.topic_dlq, b"warm-up").get(timeout=10)  # has a producer id
        transport.poll(500)  # joined, at offset 0 of the empty topic

        broker.kill()
        broker.wait()
        broker = start_tansu(port, tmp_path / "tansu.log")
        ensure_topics(bootstrap, topics, 1)
        prod = KafkaProducer(bootstrap_servers=bootstrap)
        prod.send(s.topic_interactions, key=b"u1", value=b"{not json").get(timeout=10)
        prod.send(s.topic_interactions, key=b"u1",
                  value=json.dumps({"user_id": "u1", "item_id": "i1", "ts": 1}).encode()
                  ).get(timeout=10)
        prod.close()

        tp = TopicPartition(s.topic_interactions, 0)
        committed = 0
        deadline = time.monotonic() + 90
        while committed < 2 and time.monotonic() < deadline:
            polled = transport.poll(200)  # what consumers/features.py does: poll, then commit
            if polled and transport.commit(polled.offsets):
                committed = polled.offsets.get(tp, committed)
        assert committed == 2, "the poll was never committed"
        dlq = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                            consumer_timeout_ms=5_000)
        dlq.assign([TopicPartition(s.topic_dlq, 0)])
        dead = [r.value for r in dlq]
        dlq.close()
        assert b"{not json" in dead, f"committed past a bad record missing from the DLQ: {dead}"
    finally:
        if transport is not None:
            transport.close()
        broker.kill()
        broker.wait()
