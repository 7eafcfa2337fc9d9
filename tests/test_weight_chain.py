"""Issue 9, defect 1: a weight-version chain can neither loop nor splice.

Version numbers come from INCR, so a Redis that lost data (a flush, a restart without
persistence, a failover to a replica that lagged) hands numbers out again while a trainer still
holds its old parent: version N could name parent N, and every reader that walks parents would
loop and grow memory. These tests stage exactly that against a real Redis.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, replace

import pytest
import redis
from helpers import HMAC_KEY, Publisher, make_events, make_items, seed_features
from kafka.structs import TopicPartition

from consumers.loop import Polled
from consumers.settings import TrainerSettings
from consumers.trainer import Trainer
from model.config import ModelConfig
from model.learner import OnlineLearner
from model.serialization import WeightsError
from protocol.errors import VerificationError
from protocol.topics import Source
from protocol.weights import Manifest, WeightStore


@pytest.fixture
def pub(redis_url: str, namespace: str, tiny_encoder_path: str,
        tiny_encoder) -> Publisher:  # noqa: ANN001
    items = make_items(20)
    return Publisher(redis.Redis.from_url(redis_url), namespace, tiny_encoder_path,
                     tiny_encoder, items, make_events(items, users=4, n=40))


def load_within(store: WeightStore, version: int, seconds: float = 5.0) -> BaseException | None:
    """Run store.load(version) in a thread; fail if it has not finished within `seconds` (a
    looping walk never does). Returns what it raised, or None."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            store.load(version)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert outcome, f"load({version}) still walking the chain after {seconds:.0f} s"
    return outcome[0]


def write_signed(store: WeightStore, manifest: Manifest, blob: bytes) -> None:
    """Store a manifest (signed with the real key) and its blob by hand, then point at it.
    Unset later fields are left out, as a manifest written before they existed."""
    m = manifest.sign(store.key)
    raw = {k: v for k, v in asdict(m).items()
           if not (k in ("parent_digest", "epoch") and v in (None, ""))}
    store.r.set(f"{store.ns}:v:{m.version}:blob:0", blob)
    store.r.set(f"{store.ns}:v:{m.version}:manifest", json.dumps(raw))
    store.point_to(m.version)


def test_a_version_naming_itself_as_parent_is_refused_not_followed(pub: Publisher) -> None:
    """A signed delta whose parent is itself (what the old publisher wrote after the counter
    restarted) is refused with a VerificationError; load and retention terminate."""
    store = pub.store
    first = pub.publish()
    pub.learn(make_events(pub.items, users=4, n=20, seed=1))
    delta = pub.publish(kind="delta")
    blob = store.r.get(f"{store.ns}:v:{delta.version}:blob:0")
    looping = replace(delta, version=delta.version + 1, parent=delta.version + 1, hmac="")
    write_signed(store, looping, blob)

    err = load_within(store, looping.version)
    assert isinstance(err, VerificationError), err
    assert err.reason == "chain_loop"
    # retention walks chains too: it must terminate, and keep what the good delta needs
    store.keep = 2
    store.prune()
    assert store.load(first.version).manifest.version == first.version


def test_after_redis_lost_writes_a_stale_parent_cannot_publish_a_delta(pub: Publisher) -> None:
    """A failover to a replica that missed the newest version: the counter restarts below the
    trainer's parent, so its next delta would be number N naming parent N. The store refuses
    the delta; the trainer's full snapshot is accepted and loads."""
    store = pub.store
    pub.publish()
    pub.learn(make_events(pub.items, users=4, n=20, seed=1))
    lost = pub.publish(kind="delta")
    store.r.delete(f"{store.ns}:v:{lost.version}:manifest", f"{store.ns}:v:{lost.version}:blob:0")
    store.r.set(f"{store.ns}:seq", lost.version - 1)  # the replica had not seen that INCR
    store.point_to(lost.version - 1)

    pub.learn(make_events(pub.items, users=4, n=20, seed=2))
    with pytest.raises(WeightsError):
        made = pub.publish(kind="delta")  # parent: the lost version
        load_within(store, made.version)  # (without the fix: loops; fail rather than hang)
    full = pub.publish(kind="full")
    assert full.parent is None, "the parent is not in this store's history"
    assert store.load(full.version).manifest.version == full.version


def test_a_store_that_lost_everything_starts_a_new_epoch(pub: Publisher) -> None:
    """FLUSH: the history is empty, so the next version starts a new epoch; the old parent is
    refused for a delta even when a version of that number exists again."""
    store = pub.store
    old = pub.publish()
    for key in store.r.scan_iter(f"{store.ns}:*"):
        store.r.delete(key)
    again = Publisher(store.r, store.ns.removesuffix(":w"), pub.cfg.encoder_path,
                      pub.learner.encoder, pub.items).publish()  # another trainer, same number
    assert again.version == old.version and again.epoch != old.epoch
    assert not store.extends(old)
    with pytest.raises(WeightsError):
        pub.publish(kind="delta")


def test_numbers_go_on_rising_across_a_lost_history(pub: Publisher) -> None:
    """The chaos run's FLUSHALL: the trainer republished as version 1 of a new epoch while
    clients had been served 1,910, so every client saw model_version go back. The publisher
    that still holds its parent moves the counter past it first."""
    store = pub.store
    for _ in range(3):
        old = pub.publish()
    for key in store.r.scan_iter(f"{store.ns}:*"):
        store.r.delete(key)
    again = pub.publish()  # the same trainer: a full snapshot in a new epoch
    assert again.epoch != old.epoch and again.parent is None
    assert again.version == old.version + 1, (again.version, old.version)


def test_a_delta_on_a_replaced_parent_is_refused(pub: Publisher) -> None:
    """Splicing: the parent's number now names another (validly signed) version. The child's
    parent digest no longer matches, so the chain is refused instead of applied onto the wrong
    base."""
    store = pub.store
    base = pub.publish()
    pub.learn(make_events(pub.items, users=4, n=20, seed=1))
    child = pub.publish(kind="delta")
    other = Publisher(store.r, store.ns.removesuffix(":w"), pub.cfg.encoder_path,
                      pub.learner.encoder, pub.items).publish()
    blob = store.r.get(f"{store.ns}:v:{other.version}:blob:0")
    write_signed(store, replace(other, version=base.version, hmac=""), blob)
    store.point_to(child.version)

    err = load_within(store, child.version)
    assert isinstance(err, VerificationError), f"loaded a delta onto another base: {err}"
    assert err.reason == "broken_chain"


def test_manifests_written_before_epochs_still_load(pub: Publisher) -> None:
    """Old manifests (no digest, no epoch) verify and load; their chains are checked by number."""
    store = pub.store
    full = pub.publish()
    pub.learn(make_events(pub.items, users=4, n=20, seed=1))
    delta = pub.publish(kind="delta")
    for m in (full, delta):
        blob = store.r.get(f"{store.ns}:v:{m.version}:blob:0")
        write_signed(store, replace(m, parent_digest=None, epoch="", hmac=""), blob)
    assert store.load(delta.version).manifest.version == delta.version


def test_the_trainer_republishes_a_full_snapshot_after_redis_lost_everything(
        redis_url: str, namespace: str, tiny_encoder_path: str, tiny_encoder) -> None:  # noqa: ANN001
    """The trainer holds its parent while Redis is flushed: its next version is a full snapshot
    in a new epoch that loads, not a delta onto a version the store no longer has."""
    r = redis.Redis.from_url(redis_url)
    items = make_items(20)
    fs = seed_features(r, namespace, items, [])
    s = TrainerSettings(redis_url=redis_url, namespace=namespace, hmac_key=HMAC_KEY,
                        encoder_path=tiny_encoder_path, batch_max_events=10,
                        publish_interval_ms=0)
    cfg = ModelConfig(encoder_path=tiny_encoder_path, dim=16, history_len=8, negatives=16,
                      user_heads=2, replay_size=500)
    store = WeightStore(r, HMAC_KEY.encode(), namespace)
    trainer = Trainer(s, OnlineLearner(cfg, tiny_encoder, device="cpu"), store, fs)
    trainer.bootstrap()
    tp = TopicPartition("interactions", 0)
    offset = 0

    def poll(seed: int) -> Manifest:
        nonlocal offset
        events = make_events(items, users=4, n=10, seed=seed)
        polled = Polled(interactions=[(Source(tp.topic, 0, offset + k, 0), e)
                                      for k, e in enumerate(events)],
                        offsets={tp: offset + len(events)})
        offset += len(events)
        assert trainer.on_poll(polled, 1_000.0 + offset) == {tp: offset}, "published"
        return store.manifest(store.current())

    first, second = poll(1), poll(2)
    assert (first.kind, second.kind, second.parent) == ("full", "delta", first.version)
    for key in r.scan_iter(f"{namespace}:w:*"):
        r.delete(key)  # Redis lost the weights (FLUSHALL, a restart without persistence)
    third = poll(3)
    assert third.kind == "full" and third.parent is None and third.epoch != second.epoch
    assert store.load(third.version).manifest == third
    fourth = poll(4)
    assert (fourth.kind, fourth.parent, fourth.epoch) == ("delta", third.version, third.epoch)
