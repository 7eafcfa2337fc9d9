"""Prometheus metrics of both consumer processes (each serves its own /metrics port).

Trainer-only metrics live in consumers/trainer_metrics.py, so the features process does not
export trainer series that would stay at zero."""

from prometheus_client import Counter, Gauge

RECORDS = Counter("freshrec_consumer_records", "Records polled from Kafka.",
                  ["consumer", "topic"])
LAG = Gauge("freshrec_consumer_lag", "Records behind the partition's high watermark (approximate "
            "on brokers whose end offsets lag).", ["consumer", "topic", "partition"])
DLQ = Counter("freshrec_dlq_messages", "Invalid records set aside (sent to the DLQ by the "
              "features consumer, skipped by the trainer).", ["consumer", "reason"])
STALLS = Counter("freshrec_consumer_stalls", "Stall checks that found an assigned partition "
                 "behind its log end with no record for 15 s (each resets the "
                 "fetch state; a second one in a row ends the process, to be restarted).",
                 ["consumer"])
UNASSIGNED = Counter("freshrec_consumer_unassigned", "Times a subscribed consumer stayed outside "
                     "its group (no partition, not a settled member) for 30 s although the "
                     "broker answered its joins: remedy=rejoin (a fresh consumer rejoined), "
                     "remedy=exit (still outside 30 s later; the process starts over).",
                     ["consumer", "remedy"])
DLQ_FAILURES = Counter("freshrec_dlq_write_failures", "Polls whose DLQ writes failed (fetched "
                       "again, not committed).", ["consumer"])

FEATURES_APPLIED = Counter("freshrec_features_events_applied",
                           "Interactions written to the feature store.")
FEATURES_REBUILDS = Counter("freshrec_features_rebuilds", "Times Redis had lost applied features "
                            "and the features consumer fetched the log again to rebuild them.")
