"""The trainer consumer's loop body (`Trainer.on_poll`) against a real Redis, fed polls directly.

Kafka is left out on purpose: these tests drive the logic that decides what is learned, when a
version is published and which offsets may be committed, with an exact clock.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time

import pytest
import redis
from kafka.structs import TopicPartition

from consumers.loop import Polled
from consumers.settings import TrainerSettings
from consumers.trainer import Trainer
from model.config import ModelConfig
from model.events import Interaction, Item
from model.learner import OnlineLearner
from protocol.features import FeatureStore
from protocol.topics import Source
from protocol.weights import WeightStore
from tests.helpers import HMAC_KEY

TOPIC = "interactions"
ITEMS = [Item(str(i), f"item {i} {'red' if i % 2 else 'blue'} thing") for i in range(30)]


def make_trainer(redis_url: str, namespace: str, tiny_encoder, **settings) -> Trainer:  # noqa: ANN001, ANN003
    s = TrainerSettings(redis_url=redis_url, namespace=namespace, hmac_key=HMAC_KEY,
                        encoder_path=tiny_encoder.path, trainer_metrics_port=0, **settings)
    client = redis.Redis.from_url(redis_url)
    learner = OnlineLearner(ModelConfig(encoder_path=tiny_encoder.path, negatives=16),
                            copy.deepcopy(tiny_encoder), device="cpu")
    return Trainer(s, learner, WeightStore(client, HMAC_KEY.encode(), namespace),
                   FeatureStore(client, namespace))


def poll(events: list[Interaction], first_offset: int, items: list[Item] = (),  # type: ignore[assignment]
         partition: int = 0) -> Polled:
    """One poll of one partition: `events` at consecutive offsets from `first_offset`."""
    src = [Source(TOPIC, partition, first_offset + k, 0) for k in range(len(events))]
    return Polled(interactions=list(zip(src, events, strict=True)),
                  items=[(Source("items", 0, k, 0), it) for k, it in enumerate(items)],
                  offsets={TopicPartition(TOPIC, partition): first_offset + len(events)})


def events(n: int, offset: int = 0) -> list[Interaction]:
    return [Interaction(f"u{k % 5}", str(k % 30), float(k)) for k in range(offset, offset + n)]


def test_a_redis_error_mid_poll_loses_nothing(redis_url, namespace, tiny_encoder) -> None:
    """`run` retries a failed poll with an empty one; the events of the failed poll must still
    be learned, and their offsets committed only with the version that includes them."""
    trainer = make_trainer(redis_url, namespace, tiny_encoder, batch_window_ms=100,
                           publish_interval_ms=0)
    trainer.add_items(ITEMS[:10])
    alive = trainer.features
    trainer.features = FeatureStore(redis.Redis(port=1, socket_connect_timeout=0.2), namespace)
    with pytest.raises(redis.exceptions.ConnectionError):  # the new items need Redis
        trainer.on_poll(poll(events(40), 0, items=ITEMS[10:]), now=1.0)
    trainer.features = alive  # Redis is back: the retry comes with an empty poll
    done = trainer.on_poll(Polled(), now=1.2)
    assert trainer.events_total == 40, "the failed poll's events were dropped"
    assert done == {TopicPartition(TOPIC, 0): 40}
    assert trainer.weights.current() is not None
    assert set(ITEMS[i].item_id for i in range(30)) <= set(trainer.learner.item_ids)


def test_a_trainer_reading_a_backlog_publishes_less_often_and_learns_the_same_events(
        redis_url, namespace, tiny_encoder) -> None:
    """Polls of events produced seconds ago (a burst it is behind on) stretch the publish
    interval (`model.batching.publish_due`); events produced just now keep it. Both trainers
    learn every event, and the backlogged one commits them all with its fewer versions."""
    published = {}
    for age_s in (0.0, 30.0):
        trainer = make_trainer(redis_url, f"{namespace}-{age_s:.0f}", tiny_encoder,
                               batch_window_ms=0, batch_max_events=16, publish_interval_ms=100)
        trainer.add_items(ITEMS)
        committed = 0
        for step in range(40):  # a poll of 16 events every 50 ms of the trainer's clock
            polled = poll(events(16, 16 * step), 16 * step)
            produced = int(1000 * (time.time() - age_s))
            polled.interactions = [(dataclasses.replace(src, timestamp_ms=produced), e)
                                   for src, e in polled.interactions]
            committed = trainer.on_poll(polled, now=0.05 * step).get(
                TopicPartition(TOPIC, 0), committed)
        committed = trainer.on_poll(Polled(), now=10.0).get(TopicPartition(TOPIC, 0), committed)
        assert trainer.events_total == 640 and committed == 640
        published[age_s] = trainer.published
    assert published[0.0] >= 15, published  # one every 100 ms over 2 s
    assert published[30.0] <= published[0.0] // 3, published  # one every 400 ms (4 intervals)


def test_offsets_wait_for_the_version_that_includes_them(redis_url, namespace,
                                                         tiny_encoder) -> None:
    trainer = make_trainer(redis_url, namespace, tiny_encoder, batch_window_ms=1000,
                           batch_max_events=64, publish_interval_ms=0)
    trainer.add_items(ITEMS)
    assert trainer.on_poll(poll(events(30), 0), now=0.0) == {}, "batch still open"
    assert trainer.on_poll(Polled(), now=0.5) == {}
    assert trainer.weights.current() is None
    done = trainer.on_poll(poll(events(40, 30), 30), now=0.6)  # 64 learned, 6 wait
    assert done == {TopicPartition(TOPIC, 0): 64}, "committed events that wait in the batcher"
    manifest = trainer.weights.manifest(trainer.weights.current())
    assert manifest.trained_through["offsets"] == {f"{TOPIC}:0": 64}
    assert trainer.events_total == 64, "a micro-batch held more than batch_max_events"
    assert trainer.resume_offsets(TOPIC) == {TopicPartition(TOPIC, 0): 70}, "polled already"
    assert trainer.on_poll(Polled(), now=1.7) == {TopicPartition(TOPIC, 0): 70}  # window ran out


def test_a_resumed_trainer_keeps_the_offsets_of_partitions_it_has_not_seen_since(
        redis_url, namespace, tiny_encoder) -> None:
    """The version a trainer resumes from says how far every partition was trained; the next
    version must still say so for partitions that brought nothing new (issue 9 #3)."""
    first = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=40,
                         publish_interval_ms=0)
    first.add_items(ITEMS)
    first.on_poll(poll(events(40), 0, partition=0), now=1.0)
    first.on_poll(poll(events(40, 40), 0, partition=1), now=2.0)
    store = first.weights
    assert store.manifest(store.current()).trained_through["offsets"] == \
        {f"{TOPIC}:0": 40, f"{TOPIC}:1": 40}

    first.features.upsert_items(ITEMS)  # the catalog the features consumer would have stored
    first.weights.release_lease(first.lease)  # it stops, as `run` does
    second = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=40,
                          publish_interval_ms=0)
    second.bootstrap()
    second.on_poll(poll(events(40, 80), 40, partition=0), now=1.0)
    assert store.manifest(store.current()).trained_through["offsets"] == \
        {f"{TOPIC}:0": 80, f"{TOPIC}:1": 40}
    # where a consumer resumes (the transport seeks there on assignment)
    assert second.resume_offsets(TOPIC) == {TopicPartition(TOPIC, 0): 80,
                                            TopicPartition(TOPIC, 1): 40}


def test_a_rebalance_in_the_same_process_does_not_learn_polled_events_twice(
        redis_url, namespace, tiny_encoder) -> None:
    """A step slower than max.poll.interval: the group takes the partitions away and gives them
    back. The transport then seeks where `resume_offsets` says; events polled since the last
    publish are in the learner (or its batcher) already and must not be fetched again, or the
    next version trains them twice (the chaos harness's slow_step fault)."""
    trainer = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=40,
                           batch_window_ms=10_000, publish_interval_ms=0)
    trainer.add_items(ITEMS)
    trainer.on_poll(poll(events(40), 0), now=1.0)  # learned and published
    trainer.on_poll(poll(events(10, 40), 40), now=2.0)  # polled: in the batcher, unpublished
    published = trainer.weights.manifest(trainer.weights.current())
    assert published.trained_through["offsets"] == {f"{TOPIC}:0": 40}
    assert trainer.resume_offsets(TOPIC) == {TopicPartition(TOPIC, 0): 50}


def test_redis_losing_the_parent_during_a_publish_gives_a_full_snapshot(
        redis_url, namespace, tiny_encoder) -> None:
    """The chaos harness's FLUSHALL landed between the trainer's check that its parent is still
    stored and its publish: the delta was refused (StaleParent) and the trainer crashed, which
    lost its in-memory weights along with Redis's. It must publish a full snapshot instead."""
    trainer = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=40,
                           publish_interval_ms=0)
    trainer.add_items(ITEMS)
    trainer.on_poll(poll(events(40), 0), now=1.0)
    store = trainer.weights
    served = store.manifest(store.current())
    real_extends = store.extends

    def flushed_right_after_the_check(parent):  # noqa: ANN001, ANN202
        store.extends = real_extends  # type: ignore[method-assign]  # the store's own check
        answer = real_extends(parent)  # True: the parent is there ...
        for key in store.r.scan_iter(f"{namespace}:*"):
            store.r.delete(key)  # ... and then FLUSHALL
        return answer

    store.extends = flushed_right_after_the_check  # type: ignore[method-assign]
    done = trainer.on_poll(poll(events(40, 40), 40), now=2.0)
    assert done == {TopicPartition(TOPIC, 0): 80}
    newest = store.manifest(store.current())
    assert newest.kind == "full" and newest.parent is None
    assert newest.trained_through["offsets"] == {f"{TOPIC}:0": 80}
    assert newest.version > served.version, "model_version went back for clients"


def test_model_version_goes_on_rising_after_redis_lost_everything(redis_url, namespace,
                                                                  tiny_encoder) -> None:
    """The medium chaos run of session 6: after a FLUSHALL (and after Redis restarted empty)
    the trainer published version 1 of a new epoch while clients had been served 709 (29), so
    226 (284) answers went back. The store numbers a new epoch on from the parent it is given
    (tests/test_weight_chain.py), but the trainer dropped its parent before publishing."""
    trainer = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=40,
                           publish_interval_ms=0)
    trainer.add_items(ITEMS)
    for k in range(3):
        trainer.on_poll(poll(events(40, 40 * k), 40 * k), now=1.0 + k)
    store = trainer.weights
    served = store.manifest(store.current())
    for key in store.r.scan_iter(f"{namespace}:*"):
        store.r.delete(key)  # FLUSHALL
    assert trainer.on_poll(poll(events(40, 120), 120), now=5.0) == {TopicPartition(TOPIC, 0): 160}
    newest = store.manifest(store.current())
    assert newest.kind == "full" and newest.parent is None and newest.epoch != served.epoch
    assert newest.version > served.version, (newest.version, served.version)


def mixed_events(n: int, offset: int = 0, seed: int = 0) -> list[Interaction]:
    """Many users, each seeing few items: the published weights hit some of them in the top 10."""
    rnd = random.Random(seed + offset)
    return [Interaction(f"m{rnd.randrange(60)}", str(rnd.randrange(30)), float(k))
            for k in range(offset, offset + n)]


def test_a_refused_interval_is_committed_only_with_a_version_that_records_it(
        redis_url, namespace, tiny_encoder) -> None:
    """Events the gate refused are in no weights: their offsets are held back until a published
    version records them as refused, so a crash in between trains them again (issue 9 #4)."""
    trainer = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=50,
                           publish_interval_ms=800)
    # A gate that must refuse: the candidate would need 101x the published weights' HR@10
    # (half the events held out for it, no significance asked).
    trainer.learner.cfg = dataclasses.replace(trainer.learner.cfg, gate_tolerance=-100.0,
                                              gate_min_events=1, gate_holdout=2, gate_z=0.0)
    trainer.add_items(ITEMS)
    tp = TopicPartition(TOPIC, 0)
    assert trainer.on_poll(poll(mixed_events(50), 0), now=1.0) == {tp: 50}  # nothing to gate yet
    first = trainer.weights.current()

    trainer._last_eval = 0.0  # score this batch (the trainer samples evaluation by cost)
    assert trainer.on_poll(poll(mixed_events(50, 50), 50), now=2.0) == {}, \
        "refused events were committed without being in any weights"
    assert trainer.weights.current() == first
    assert trainer.on_poll(poll([], 0, items=[ITEMS[0]]), now=2.5) == {}, \
        "an items-only poll committed past the refused events"

    trainer.learner.cfg = dataclasses.replace(trainer.learner.cfg, gate=False)  # next one passes
    assert trainer.on_poll(poll(mixed_events(50, 100), 100), now=3.0) == {tp: 150}
    through = trainer.weights.manifest(trainer.weights.current()).trained_through
    assert through["offsets"] == {f"{TOPIC}:0": 150}
    assert through["refused"] == {f"{TOPIC}:0": [50, 100]}
    assert through["refused_events"] == 50
    assert through["refused_reason"].startswith("gate_refused: holdout HR@10")


def test_a_refused_interval_on_a_stream_that_went_quiet_is_recorded_and_committed(
        redis_url, namespace, tiny_encoder) -> None:
    """The gate refused the last events before the stream went quiet: nothing new arrives to
    carry the refusal, so without more the refused offsets were never committed and no served
    version covered them (the quick chaos run's "not trained at end", 17 events, in CI). Once
    a publish is due the trainer publishes the rolled-back weights as a version that records
    the refused interval, and hands its offsets to the commit."""
    trainer = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=50,
                           publish_interval_ms=100)
    trainer.learner.cfg = dataclasses.replace(trainer.learner.cfg, gate_tolerance=-100.0,
                                              gate_min_events=1, gate_holdout=2, gate_z=0.0)
    trainer.add_items(ITEMS)
    tp = TopicPartition(TOPIC, 0)
    assert trainer.on_poll(poll(mixed_events(50), 0), now=1.0) == {tp: 50}
    first = trainer.weights.current()
    trainer._last_eval = 0.0
    assert trainer.on_poll(poll(mixed_events(50, 50), 50), now=2.0) == {}  # refused
    assert trainer.on_poll(Polled(), now=2.05) == {}, "published before the interval"
    assert trainer.on_poll(Polled(), now=2.2) == {tp: 100}, \
        "the refused interval is never committed on a quiet stream"
    newest = trainer.weights.manifest(trainer.weights.current())
    assert newest.version > first
    assert newest.trained_through["offsets"] == {f"{TOPIC}:0": 100}
    assert newest.trained_through["refused"] == {f"{TOPIC}:0": [50, 100]}
    assert newest.trained_through["events"] == 0
    assert trainer.on_poll(Polled(), now=3.0) == {}, "published again with nothing new"
    assert trainer.weights.current() == newest.version


def test_snapshots_for_late_joiners_ride_beside_deltas(redis_url, namespace,
                                                      tiny_encoder) -> None:
    """After the first version the trainer publishes deltas only; every so often one carries
    a checkpoint (the whole state) for servers that do not hold its parent. Before, that was a
    full snapshot, which every following server loaded whole (issue 8: the slowest swap)."""
    trainer = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=40,
                           publish_interval_ms=0, full_every=2)
    trainer.full_bytes = 0  # a checkpoint as soon as `full_every` allows
    trainer.add_items(ITEMS)
    for k in range(6):
        trainer.on_poll(poll(events(40, 40 * k), 40 * k), now=1.0 + k)
    store = trainer.weights
    kinds = [(m.kind, bool(m.checkpoint)) for m in map(store.manifest, store.versions())]
    assert kinds[0] == ("full", False)
    assert all(kind == "delta" for kind, _ in kinds[1:]), kinds
    assert any(ckpt for _, ckpt in kinds[1:]), kinds
    fresh = store.load(store.current())  # a late joiner, from the newest checkpoint
    assert fresh.item_ids == trainer.learner.item_ids


def test_only_the_lease_holder_publishes_and_a_zombie_cannot(redis_url, namespace,
                                                             tiny_encoder) -> None:
    """Two trainers on one store: the one holding the publisher lease publishes, the other
    does not; once the lease expired and passed on, the old holder cannot publish (issue 9 #7)."""
    a = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=40,
                     publish_interval_ms=0, lease_ttl_ms=1000)
    b = make_trainer(redis_url, namespace, tiny_encoder, batch_max_events=40,
                     publish_interval_ms=0, lease_ttl_ms=1000)
    a.add_items(ITEMS)
    b.add_items(ITEMS)
    tp = TopicPartition(TOPIC, 0)
    assert a.on_poll(poll(events(40), 0), now=1.0) == {tp: 40}
    assert b.on_poll(poll(events(40), 0), now=1.0) == {}, "a second trainer published"
    store = a.weights
    assert len(store.versions()) == 1

    time.sleep(1.2)  # a stalls past its lease; b takes over
    assert b.on_poll(poll(events(40, 40), 40), now=3.0) == {tp: 80}
    taken = store.current()
    from protocol.errors import LeaseLost

    with pytest.raises(LeaseLost):
        a.on_poll(poll(events(40, 40), 40), now=3.0)
    assert store.current() == taken and len(store.versions()) == 2
