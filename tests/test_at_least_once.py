"""Invariant 1: offsets are committed only after the weights including those events are
published. A trainer killed between publish and commit trains the same events again."""

from __future__ import annotations

import json

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from protocol.weights import WeightStore
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def committed_total(env: dict[str, str]) -> int:
    c = KafkaConsumer(bootstrap_servers=env["FRESHREC_KAFKA_BOOTSTRAP"],
                      group_id=env["FRESHREC_TRAINER_GROUP"], enable_auto_commit=False)
    try:
        parts = c.partitions_for_topic(env["FRESHREC_TOPIC_INTERACTIONS"]) or set()
        return sum(c.committed(TopicPartition(env["FRESHREC_TOPIC_INTERACTIONS"], p)) or 0
                   for p in parts)
    finally:
        c.close()


def test_crash_after_publish_before_commit_replays(stack_env, spawn) -> None:
    env = {**stack_env, "FRESHREC_CRASH_AFTER_PUBLISH": "1",
           "FRESHREC_BATCH_MAX_EVENTS": "1000", "FRESHREC_BATCH_WINDOW_MS": "1000"}
    prod = KafkaProducer(bootstrap_servers=env["FRESHREC_KAFKA_BOOTSTRAP"])
    for i in range(10):
        prod.send(env["FRESHREC_TOPIC_ITEMS"], key=str(i).encode(),
                  value=json.dumps({"item_id": str(i), "text": f"item {i}"}).encode())
    for n in range(120):
        prod.send(env["FRESHREC_TOPIC_INTERACTIONS"], key=f"u{n % 12}".encode(),
                  value=json.dumps({"user_id": f"u{n % 12}", "item_id": str(n % 10),
                                    "ts": 1000 + n}).encode())
    prod.flush()

    crashing = spawn("consumers.trainer", env)
    code = wait_for(lambda: crashing.p.poll(), 90, "the fault-injected exit after publishing")
    assert code == 3, crashing.output()
    store = WeightStore(redis.Redis.from_url(env["FRESHREC_REDIS_URL"]),
                        env["FRESHREC_HMAC_KEY"].encode(), env["FRESHREC_NAMESPACE"])
    first = store.manifest(store.current())
    assert first.trained_through["events"] == 120, first.trained_through
    assert committed_total(env) == 0, "nothing may be committed before the crash"

    restarted = spawn("consumers.trainer", {**env, "FRESHREC_CRASH_AFTER_PUBLISH": "0"})
    second = wait_for(lambda: (store.current() or 0) > first.version and
                      store.manifest(store.current()), 90, "a version after the restart")
    assert second.parent == first.version, "the restart resumes from the published weights"
    assert second.trained_through["events"] == 120, "the uncommitted events are trained again"
    wait_for(lambda: committed_total(env) == 120, 30, "offsets committed after the publish")
    assert restarted.p.poll() is None, restarted.output()
