"""Invariant 1: offsets are committed only after the weights including those events are
published. A trainer killed between publish and commit trains the same events again."""

from __future__ import annotations

import json
import time

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from model.events import Item
from protocol.features import FeatureStore
from protocol.weights import Manifest, WeightStore
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


def test_crash_after_publish_before_commit_loses_and_repeats_nothing(stack_env, spawn) -> None:
    """The restart resumes from the published version's offsets: the events it covers are not
    trained again, and the group's commit catches up with the next version."""
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
    send_events(env, 120, 12)
    wait_for(lambda: committed_total(env) == 132, 90, "offsets committed after the restart")
    after = [store.manifest(v) for v in store.versions() if v > first.version]
    assert after[0].parent == first.version, "the restart resumes from the published weights"
    assert sum(m.trained_through["events"] for m in after) == 12, \
        "events already in the published weights were trained again"
    assert restarted.p.poll() is None, restarted.output()


def send_events(env: dict[str, str], first: int, n: int) -> None:
    prod = KafkaProducer(bootstrap_servers=env["FRESHREC_KAFKA_BOOTSTRAP"])
    for k in range(first, first + n):
        prod.send(env["FRESHREC_TOPIC_INTERACTIONS"], key=f"u{k % 12}".encode(),
                  value=json.dumps({"user_id": f"u{k % 12}", "item_id": str(k % 10),
                                    "ts": 1000 + k}).encode())
    prod.flush()
    prod.close()


def commit_everything(env: dict[str, str], expected: int) -> None:
    """Commit the trainer group past every interaction by hand: the group's offsets run ahead
    of the weights, as after Redis lost its newest writes or an operator rolled back."""
    topic = env["FRESHREC_TOPIC_INTERACTIONS"]
    c = KafkaConsumer(bootstrap_servers=env["FRESHREC_KAFKA_BOOTSTRAP"],
                      group_id=env["FRESHREC_TRAINER_GROUP"], enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
        c.assign(parts)
        c.seek_to_beginning(*parts)
        ends: dict[TopicPartition, int] = {}
        seen = 0
        deadline = time.monotonic() + 30
        while seen < expected and time.monotonic() < deadline:
            for tp, records in c.poll(timeout_ms=500).items():
                seen += len(records)
                ends[tp] = records[-1].offset + 1
        assert seen == expected, f"read {seen} of {expected} interactions"
        c.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in ends.items()})
    finally:
        c.close()


def interactions_through(env: dict[str, str], manifest: Manifest) -> int:
    prefix = env["FRESHREC_TOPIC_INTERACTIONS"] + ":"
    return sum(off for key, off in manifest.trained_through["offsets"].items()
               if key.startswith(prefix))


def test_a_restart_resumes_from_the_weights_offsets_not_the_groups(stack_env, spawn) -> None:
    """Issue 9 #3: the trained-through offsets of the version a trainer resumes from are where
    it resumes. Events the group committed but no version trained are trained on restart."""
    env = {**stack_env, "FRESHREC_BATCH_MAX_EVENTS": "1000", "FRESHREC_BATCH_WINDOW_MS": "500"}
    client = redis.Redis.from_url(env["FRESHREC_REDIS_URL"])
    items = [Item(str(i), f"item {i}") for i in range(10)]
    FeatureStore(client, env["FRESHREC_NAMESPACE"]).upsert_items(items)  # the stored catalog
    store = WeightStore(client, env["FRESHREC_HMAC_KEY"].encode(), env["FRESHREC_NAMESPACE"])
    send_events(env, 0, 60)

    trainer = spawn("consumers.trainer", env)
    wait_for(lambda: committed_total(env) == 60, 90, "the first 60 events trained and committed")
    assert trainer.stop() == 0, trainer.output()
    first = store.manifest(store.current())
    assert interactions_through(env, first) == 60

    send_events(env, 60, 60)
    commit_everything(env, expected=120)  # committed, but in no weights
    assert committed_total(env) == 120

    restarted = spawn("consumers.trainer", env)
    send_events(env, 120, 12)
    newest = wait_for(lambda: (m := store.manifest(store.current())) and
                      interactions_through(env, m) == 132 and m, 90, "a version through 132")
    retrained = sum(store.manifest(v).trained_through["events"] for v in store.versions()
                    if v > first.version)
    assert retrained == 72, "the events between the weights' offsets and the group's were skipped"
    assert newest.parent is not None
    assert restarted.p.poll() is None, restarted.output()
