"""The features consumer: every interaction lands in the user's Redis history within
milliseconds, every item in the catalog. Malformed records go to the DLQ with their reason."""

from __future__ import annotations

import faulthandler
import logging
import signal
import time

import redis
from kafka.structs import TopicPartition
from prometheus_client import start_http_server

from consumers import metrics
from consumers.loop import Polled, Transport
from consumers.settings import FeaturesSettings
from protocol.features import FeaturesLost, FeatureStore
from protocol.runtime import freeze_long_lived

log = logging.getLogger("freshrec.features")
REBUILD_CHECK_S = 1.0  # how often the consumer checks that Redis still has what it applied


def apply(store: FeatureStore, polled: Polled, gaps_ok: dict[str, int] | None = None) -> None:
    """The whole logic: items to the catalog, interactions to histories (in record order),
    each record once: a poll delivered again after a crash before its commit changes nothing."""
    applied = store.apply_records(polled.interactions, polled.items,
                                  skipped=[src for src, *_ in polled.errors], gaps_ok=gaps_ok)
    metrics.FEATURES_APPLIED.inc(applied)


def rewind(transport: Transport, applied: dict[str, int]) -> None:
    """Fetch these partitions ("topic:partition" -> offset) again from the offsets given."""
    for key, offset in applied.items():
        topic, _, partition = key.rpartition(":")
        log.warning("Redis lost features of %s (applied through %s); rebuilding them from the "
                    "log", key, offset)
        transport.consumer.seek(TopicPartition(topic, int(partition)), offset)
    metrics.FEATURES_REBUILDS.inc()


def rewind_lost(store: FeatureStore, transport: Transport) -> int:
    """Where Redis no longer has what this consumer applied (it restarted empty, was flushed,
    failed over to a replica that missed the newest writes), fetch again from the offset Redis
    last applied (0: the whole log): the store is rebuilt from the log, each record once.
    Call it between polls (every fetched record applied). Returns how many partitions moved."""
    applied = store.applied_offsets()
    lost = {}
    for tp in transport.consumer.assignment():
        position = transport.consumer.position(tp)
        key = f"{tp.topic}:{tp.partition}"
        if position is not None and applied.get(key, 0) < position:
            lost[key] = applied.get(key, 0)
    if lost:
        rewind(transport, lost)
    return len(lost)


def run(settings: FeaturesSettings) -> None:
    """Poll, apply, commit; forever, until SIGTERM."""
    if settings.features_metrics_port:
        try:
            start_http_server(settings.features_metrics_port, addr="0.0.0.0")
        except OSError as exc:
            raise SystemExit(f"features consumer: cannot serve metrics on port "
                             f"{settings.features_metrics_port} ({exc.strerror}); set "
                             "FRESHREC_FEATURES_METRICS_PORT to a free port (0 = no metrics)"
                             ) from None
    store = FeatureStore(settings.redis_client(), settings.namespace, settings.history_len,
                         settings.user_ttl_s)
    transport = Transport(settings, settings.features_group, "features", dlq=True)
    transport.install_signal_handlers()
    freeze_long_lived("startup")
    log.info("features consumer up (group %s)", settings.features_group)
    checked = 0.0
    rewound: dict[str, int] = {}  # where a rebuild started: a gap there is the log's own start
    try:
        for polled in transport.batches(timeout_ms=100):
            if polled:
                try:
                    apply_until_done(store, polled, transport, rewound)
                except FeaturesLost as lost:  # this poll starts past what Redis still has
                    rewind(transport, lost.applied)
                    rewound = lost.applied
                    continue
                rewound = {}
                transport.commit(polled.offsets)
            if time.monotonic() - checked >= REBUILD_CHECK_S:  # between polls: all applied
                checked = time.monotonic()
                try:
                    rewind_lost(store, transport)
                except redis.exceptions.RedisError:
                    pass  # Redis away: the next apply waits for it
    finally:
        transport.close()


def apply_until_done(store: FeatureStore, polled: Polled, transport: Transport,
                     gaps_ok: dict[str, int]) -> None:
    """Apply one poll, waiting out Redis errors; nothing is committed until it is applied."""
    while True:
        try:
            apply(store, polled, gaps_ok)
            return
        except redis.exceptions.RedisError as exc:  # wait for Redis, lose nothing
            # (down, paused past the socket timeout, a read-only replica after a
            # failover: nothing is committed until the poll is applied)
            log.warning("redis unavailable (%s); retrying", exc)
            if not transport.running:
                raise SystemExit(0) from None
            time.sleep(0.5)


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(FeaturesSettings())


if __name__ == "__main__":
    main()
