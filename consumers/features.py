"""The features consumer: every interaction lands in the user's Redis history within
milliseconds, every item in the catalog. Malformed records go to the DLQ with their reason."""

from __future__ import annotations

import logging
import time

import redis
from prometheus_client import start_http_server

from consumers import metrics
from consumers.loop import Polled, Transport
from consumers.settings import FeaturesSettings
from protocol.features import FeatureStore

log = logging.getLogger("freshrec.features")


def apply(store: FeatureStore, polled: Polled) -> None:
    """The whole logic: items to the catalog, interactions to histories (in record order),
    each record once: a poll delivered again after a crash before its commit changes nothing."""
    applied = store.apply_records(polled.interactions, polled.items)
    metrics.FEATURES_APPLIED.inc(applied)


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
    log.info("features consumer up (group %s)", settings.features_group)
    try:
        for polled in transport.batches(timeout_ms=100):
            if not polled:
                continue
            while True:
                try:
                    apply(store, polled)
                    break
                except redis.exceptions.RedisError as exc:  # wait for Redis, lose nothing
                    # (down, paused past the socket timeout, a read-only replica after a
                    # failover: nothing is committed until the poll is applied)
                    log.warning("redis unavailable (%s); retrying", exc)
                    if not transport.running:
                        return
                    time.sleep(0.5)
            transport.commit(polled.offsets)
    finally:
        transport.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(FeaturesSettings())


if __name__ == "__main__":
    main()
