"""Prometheus metrics of the trainer process only."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("freshrec_trainer_events", "Fresh interactions trained on.")
HELD_OUT = Counter("freshrec_trainer_held_out_events",
                   "Interactions set aside for the validation gate (learned later by replay).")
BATCH = Histogram("freshrec_trainer_batch_size", "Fresh events per micro-batch.",
                  buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048))
STEP = Histogram("freshrec_trainer_step_seconds", "Wall time of one learn() call.",
                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
LOSS = Gauge("freshrec_trainer_loss", "Cross-entropy of the last step.")
LR = Gauge("freshrec_trainer_learning_rate", "Learning rate after the adaptive multiplier.")
PUBLISHED = Counter("freshrec_trainer_versions_published", "Model versions published.")
PUBLISH_SECONDS = Histogram("freshrec_trainer_publish_seconds", "Serialise + store + notify.",
                            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5))
PUBLISH_BYTES = Histogram("freshrec_trainer_publish_bytes", "Size of a published blob.",
                          buckets=(1e3, 1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8))
GATE_REFUSALS = Counter("freshrec_trainer_gate_refusals",
                        "Publishes refused by the validation gate.")
ROLLBACKS = Counter("freshrec_trainer_rollbacks", "Rollbacks to the last published weights.")
ONLINE_HR = Gauge("freshrec_online_hr_at_10",
                  "Prequential HR@10 over the last window of events (scored before training).")
ONLINE_NDCG = Gauge("freshrec_online_ndcg_at_10", "Prequential NDCG@10 over the same window.")
