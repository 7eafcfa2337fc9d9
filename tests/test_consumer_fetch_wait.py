"""The consumers read a partition of many small batches on the embedded broker.

The full-size chaos run of 2026-11-30 had both consumers "stalled" from ~60,000 records per
partition on: the stall watchdog reset them and restarted them every 15-40 s, and a trainer
took four minutes to come back from a kill. The cause was the consumers' fetch wait (50 ms):
Tansu 0.6.0's in-memory storage takes longer to answer a fetch the more batches a partition
holds (the chaos producer's 100 events/s are about one record per batch) and, when that is
longer than the fetch's max wait, answers with nothing, every time. Here a partition is filled
with one-record batches until a plain consumer asking for answers within 50 ms reads nothing
of its tail, and then to twice that depth (at the threshold some fetches still get through);
the transport must still read the tail. About 2.5 minutes here: the broker takes ~750
one-record batches a second.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from consumers.loop import Transport
from consumers.settings import FeaturesSettings
from freshrec.services import free_port, start_tansu
from protocol.topics import ensure_topics

pytestmark = pytest.mark.integration

OLD_WAIT_MS = 50  # the consumers' fetch wait before
STEP = 10_000  # one-record batches added per round
BUILD_S = 180.0  # at most this long finding the depth (~750 batches/s here), then as long again
BODY = b'{"user_id":"u1","item_id":"17","event":"click","ts":1764491234.1}'


def _one_record_batches(bootstrap: str, topic: str, n: int) -> None:
    prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, batch_size=1, acks=1)
    for _ in range(n):
        prod.send(topic, BODY, partition=0)
    prod.flush()
    prod.close()


def _reads_tail(bootstrap: str, tp: TopicPartition, end: int, wait_ms: int,
                seconds: float) -> int:
    """Records of the last 1,000 a plain consumer with this fetch wait reads in `seconds`."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                      fetch_max_wait_ms=wait_ms)
    try:
        c.assign([tp])
        c.seek(tp, end - 1000)
        got, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline and got < 1000:
            got += sum(len(recs) for recs in c.poll(timeout_ms=100).values())
        return got
    finally:
        c.close()


def test_the_tail_of_a_partition_of_many_small_batches_is_read(tmp_path: Path,
                                                                 namespace: str) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    s = FeaturesSettings(kafka_bootstrap=bootstrap, topic_interactions=f"{namespace}.i",
                         topic_items=f"{namespace}.it", topic_dlq=f"{namespace}.dlq",
                         partitions=1, features_group=f"{namespace}-features")
    tp = TopicPartition(s.topic_interactions, 0)
    broker = start_tansu(port, tmp_path / "tansu.log")
    transport = None
    try:
        ensure_topics(bootstrap, [s.topic_interactions, s.topic_items, s.topic_dlq], 1)
        end, started = 0, time.monotonic()
        while True:  # deep enough that the broker cannot answer a fetch within 50 ms
            _one_record_batches(bootstrap, tp.topic, STEP)
            end += STEP
            if _reads_tail(bootstrap, tp, end, OLD_WAIT_MS, seconds=3.0) == 0:
                break
            if time.monotonic() - started > BUILD_S:
                pytest.skip(f"this broker still answers a {OLD_WAIT_MS} ms fetch at {end} "
                            "one-record batches: the condition cannot be staged here")
        # At that depth the broker's answer takes about 50 ms, so some fetches still get
        # through (the transport read the tail there with 50 ms); at twice the depth none does.
        _one_record_batches(bootstrap, tp.topic, end)
        end *= 2
        print(f"{end} one-record batches ({time.monotonic() - started:.0f} s to fill); a "
              f"{OLD_WAIT_MS} ms fetch read nothing of the tail at half as many")
        transport = Transport(s, s.features_group, "features", dlq=False,
                              positions=lambda: {tp: end - 1000})
        transport.stall_s = 1e9  # the watchdog's resets are not what is tested
        reached, deadline = 0, time.monotonic() + 30
        while reached < end and time.monotonic() < deadline:
            reached = max(reached, transport.poll(100).offsets.get(tp, 0))
        assert reached == end, (f"the transport reached offset {reached} of {end} in 30 s "
                                f"(it started at {end - 1000})")
    finally:
        if transport is not None:
            transport.close()
        broker.kill()
        broker.wait()
