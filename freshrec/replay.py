"""Replaying a dataset into Kafka at a fixed rate: the catalog first, then events in time order."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

from model.events import Interaction, Item

# A paced stream's producer batches for up to this long. Tansu's in-memory log (the embedded
# broker) costs CPU per fetch in proportion to the record batches it holds: 500 events/s with
# 5 ms batches had it at a whole core after 60 s (30,000 events), 50 ms batches at 0.02 core
# (bench/RESULTS.md, "The broker's CPU"). It adds at most this much to freshness.
LINGER_MS = 50


def producer(bootstrap: str):  # noqa: ANN201 - kafka.KafkaProducer
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=LINGER_MS,
                         batch_size=64 * 1024)


def send_items(prod, topic: str, items: Sequence[Item]) -> None:  # noqa: ANN001
    for item in items:
        body = {**item.fields, "item_id": item.item_id, "text": item.text}
        prod.send(topic, key=item.item_id.encode(), value=json.dumps(body).encode())
    prod.flush()


def replay_events(prod, topic: str, events: Sequence[Interaction], rate: float,  # noqa: ANN001
                  on_progress: Callable[[int], None] | None = None,
                  should_stop: Callable[[], bool] = lambda: False) -> int:
    """Send events paced at `rate` per second (0 = as fast as possible). Returns how many."""
    start = time.monotonic()
    sent = 0
    for e in events:
        if should_stop():
            break
        if rate > 0:
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        body = {"user_id": e.user_id, "item_id": e.item_id, "event": e.event, "ts": e.ts}
        prod.send(topic, key=e.user_id.encode(), value=json.dumps(body).encode())
        sent += 1
        if on_progress is not None and sent % 100 == 0:
            on_progress(100)
    prod.flush()
    return sent
