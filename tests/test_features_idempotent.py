"""The features consumer applies each record once (issue 9 #5): Kafka delivers a poll again
after a crash between applying it to Redis and committing it, and the replay must not append
histories or count popularity twice. Real Redis, the consumer's own `apply`."""

from __future__ import annotations

import pytest
import redis
from kafka.structs import TopicPartition

from consumers.features import apply
from consumers.loop import Polled
from model.events import Interaction, Item
from protocol.features import FeaturesLost, FeatureStore
from protocol.topics import Source

TOPIC = "interactions"


def poll(first: int, last: int, partition: int = 0) -> Polled:
    """Interactions at offsets first..last (inclusive) of one partition, plus one item."""
    events = [(Source(TOPIC, partition, k, 0), Interaction(f"u{k % 3}", f"i{k % 5}", float(k)))
              for k in range(first, last + 1)]
    return Polled(interactions=events, items=[(Source("items", 0, 0, 0), Item("i0", "zero"))],
                  offsets={TopicPartition(TOPIC, partition): last + 1,
                           TopicPartition("items", 0): 1})


def state(store: FeatureStore) -> tuple:
    return (tuple(store.user_state(f"u{u}")[0] for u in range(3)), tuple(store.popular(10)),
            store.items_log_length())


def test_a_poll_applied_again_changes_nothing(redis_url: str, namespace: str) -> None:
    store = FeatureStore(redis.Redis.from_url(redis_url), namespace)
    apply(store, poll(0, 11))
    before = state(store)
    assert sum(n for _, n in before[1]) == 12
    apply(store, poll(0, 11))  # the consumer died before its commit: the poll comes again
    assert state(store) == before, "a replayed poll was applied twice"


def test_an_overlapping_replay_applies_only_what_is_new(redis_url: str, namespace: str) -> None:
    store = FeatureStore(redis.Redis.from_url(redis_url), namespace)
    apply(store, poll(0, 11))
    apply(store, poll(8, 15))  # fetched again from an older position, with newer records
    apply(store, poll(0, 3, partition=1))  # another partition has its own offsets
    expected = [f"i{k % 5}" for k in range(16) if k % 3 == 0] + ["i0", "i3"]
    assert store.user_state("u0")[0] == expected
    assert sum(n for _, n in store.popular(10)) == 16 + 4


def test_features_redis_lost_are_rebuilt_from_the_log_each_record_once(redis_url: str,
                                                                      namespace: str) -> None:
    """Redis restarted empty (or was flushed): a poll that starts past what Redis has applied
    is refused with the offset to fetch again from, and the replay from there rebuilds the
    histories and popularity exactly (issue 9: features rebuilt after Redis lost its data)."""
    client = redis.Redis.from_url(redis_url)
    store = FeatureStore(client, namespace)
    apply(store, poll(0, 11))
    expected = state(store)
    for key in client.scan_iter(f"{namespace}:*"):
        client.delete(key)  # the data is gone; the consumer's position is not
    with pytest.raises(FeaturesLost) as lost:
        apply(store, poll(12, 15))
    assert lost.value.applied == {f"{TOPIC}:0": 0}
    assert state(store)[2] == 0, "nothing may be written past a gap"
    apply(store, poll(0, 11))  # fetched again from offset 0
    assert state(store) == expected
    apply(store, poll(12, 15))
    assert sum(n for _, n in store.popular(10)) == 16


def test_a_log_that_starts_later_is_accepted_after_one_rewind(redis_url: str,
                                                              namespace: str) -> None:
    """After a rewind, a gap at the same offset is the log's own start (retention)."""
    store = FeatureStore(redis.Redis.from_url(redis_url), namespace)
    with pytest.raises(FeaturesLost):
        apply(store, poll(5, 9))
    apply(store, poll(5, 9), gaps_ok={f"{TOPIC}:0": 0})
    assert sum(n for _, n in store.popular(10)) == 5
