"""Invariant 5 on the stream: a malformed record goes to the DLQ with headers naming where it
came from and why, and later good records on the same partition still flow."""

from __future__ import annotations

import json

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from protocol.features import FeatureStore
from tests.conftest import wait_for

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
