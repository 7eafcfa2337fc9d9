"""A consumer whose client stops fetching while its partition grows is noticed and unstuck.

The chaos run found a trainer, restarted after a kill -9, that published nothing for minutes:
kafka-python 3.0 had left its partitions unfetchable after the rebalance (dpkp/kafka-python
#3106, #3131), every poll came back empty, and nothing said so. Here a partition is paused
behind the transport's back (the client state that bug leaves: nothing is fetched, nothing is
reported) while records wait; the transport must reset the fetch state and get them, and when
even that does not help, raise ConsumerStalled so the process is restarted.
"""

from __future__ import annotations

import json
import time

import pytest
from kafka import KafkaProducer
from kafka.structs import TopicPartition

from consumers.loop import ConsumerStalled, Transport
from consumers.settings import FeaturesSettings

pytestmark = pytest.mark.integration


def _transport(kafka_bootstrap: str, namespace: str) -> tuple[Transport, TopicPartition]:
    s = FeaturesSettings(kafka_bootstrap=kafka_bootstrap, topic_interactions=f"{namespace}.i",
                         topic_items=f"{namespace}.it", topic_dlq=f"{namespace}.dlq",
                         partitions=1, features_group=f"{namespace}-features")
    transport = Transport(s, s.features_group, "features", dlq=False)
    transport.stall_s = 1.0
    return transport, TopicPartition(s.topic_interactions, 0)


def _send(bootstrap: str, topic: str, n: int, start: int = 0) -> None:
    prod = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(start, start + n):
        prod.send(topic, key=b"u1", value=json.dumps({"user_id": "u1", "item_id": f"i{i}",
                                                      "ts": i}).encode())
    prod.flush()
    prod.close()


def _poll_until(transport: Transport, tp: TopicPartition, offset: int, seconds: float) -> int:
    reached = 0
    deadline = time.monotonic() + seconds
    while reached < offset and time.monotonic() < deadline:
        reached = max(reached, transport.poll(100).offsets.get(tp, 0))
    return reached


def test_a_partition_that_stops_fetching_is_reset_and_read(kafka_bootstrap: str,
                                                             namespace: str) -> None:
    transport, tp = _transport(kafka_bootstrap, namespace)
    try:
        _send(kafka_bootstrap, tp.topic, 5)
        assert _poll_until(transport, tp, 5, 60) == 5, "the first records never came"
        transport.consumer.pause(tp)  # the client stops fetching; nobody is told
        _send(kafka_bootstrap, tp.topic, 5, start=5)
        assert _poll_until(transport, tp, 10, 20) == 10, \
            "polls stayed empty while the partition held 5 unread records"
    finally:
        transport.close()


def test_an_idle_consumer_at_the_log_end_is_not_stalled(kafka_bootstrap: str,
                                                        namespace: str) -> None:
    transport, tp = _transport(kafka_bootstrap, namespace)
    try:
        _send(kafka_bootstrap, tp.topic, 3)
        assert _poll_until(transport, tp, 3, 60) == 3
        deadline = time.monotonic() + 4 * transport.stall_s
        while time.monotonic() < deadline:  # nothing to fetch: empty polls are fine
            assert not transport.poll(100)
    finally:
        transport.close()


class _CannotReset(Transport):
    """A client no reset helps (the remedy is a no-op): the transport must give up loudly."""

    def _reset_fetch(self, behind: object) -> None:
        pass


def test_a_stall_that_no_reset_cures_ends_the_consumer(kafka_bootstrap: str,
                                                       namespace: str) -> None:
    transport, tp = _transport(kafka_bootstrap, namespace)
    transport.__class__ = _CannotReset
    try:
        _send(kafka_bootstrap, tp.topic, 2)
        assert _poll_until(transport, tp, 2, 60) == 2
        transport.consumer.pause(tp)
        _send(kafka_bootstrap, tp.topic, 2, start=2)
        with pytest.raises(ConsumerStalled, match="still no record"):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                transport.poll(100)
    finally:
        transport.close()
