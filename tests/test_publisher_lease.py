"""One publisher at a time (issue 9 #7): a lease with a fencing token, checked in the very
transaction that moves the pointer, against a real Redis."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from model.events import Item
from protocol.errors import LeaseLost
from protocol.features import FeatureStore
from protocol.weights import Lease, WeightStore
from tests.conftest import wait_for
from tests.helpers import HMAC_KEY
from tests.test_at_least_once import committed_total, send_events


@pytest.fixture
def store(redis_url: str, namespace: str) -> WeightStore:
    return WeightStore(redis.Redis.from_url(redis_url), HMAC_KEY.encode(), namespace)


def publish(store: WeightStore, lease: Lease | None, body: bytes = b"weights") -> int:
    return store.publish(body, parent=None, kind="full", config={}, encoder="e",
                         trained_through={}, lease=lease).version


def version_keys(store: WeightStore) -> set[str]:
    return {k.decode() for k in store.r.scan_iter(f"{store.ns}:v:*")}


def test_only_the_lease_holder_publishes(store: WeightStore) -> None:
    a = store.acquire_lease("a", ttl_ms=5_000)
    assert a is not None
    assert store.acquire_lease("b", ttl_ms=5_000) is None, "two publishers hold the lease"
    v = publish(store, a)
    with pytest.raises(LeaseLost):
        publish(store, None)  # no lease while another publisher holds one
    with pytest.raises(LeaseLost):
        publish(store, Lease(a.token + 1, "b", 5_000))  # a token nobody was given
    assert store.versions() == [v] and store.current() == v


def test_a_zombie_whose_lease_passed_on_cannot_publish(store: WeightStore) -> None:
    zombie = store.acquire_lease("zombie", ttl_ms=200)
    assert zombie is not None
    time.sleep(0.3)  # it stalls past its lease (GC pause, stopped VM, partition)
    successor = store.acquire_lease("successor", ttl_ms=5_000)
    assert successor is not None and successor.token > zombie.token
    v = publish(store, successor)
    before = version_keys(store)
    assert not store.renew_lease(zombie)
    with pytest.raises(LeaseLost):
        publish(store, zombie)
    assert store.current() == v and store.versions() == [v]
    assert version_keys(store) == before, "the refused publish left keys behind"


def test_the_lease_is_checked_in_the_transaction_that_moves_the_pointer(
        store: WeightStore, redis_url: str) -> None:
    """Another publisher takes the lease after the holder's check, before its EXEC: the
    pointer must not move, and the version's keys go away again."""
    thief = redis.Redis.from_url(redis_url)

    class Racing(WeightStore):
        def _point(self, pipe: Any, version: int) -> None:
            thief.set(self.lease_key, "99:thief")  # lands between WATCH and EXEC
            super()._point(pipe, version)

    holder = store.acquire_lease("holder", ttl_ms=5_000)
    racing = Racing(store.r, store.key, store.ns.removesuffix(":w"))
    with pytest.raises(LeaseLost):
        publish(racing, holder)
    assert store.current() is None and store.versions() == [] and version_keys(store) == set()


def race(store: WeightStore, n: int) -> list[str]:
    """`n` publishers start at once, each publishing if it gets the lease; who published."""
    start = threading.Barrier(n)
    published: list[str] = []
    failed: list[BaseException] = []

    def publisher(name: str) -> None:
        start.wait()
        try:
            lease = store.acquire_lease(name, ttl_ms=5_000)
            if lease is not None:
                publish(store, lease, name.encode())
                published.append(name)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failed.append(exc)

    threads = [threading.Thread(target=publisher, args=(f"p{k}",)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed, failed
    return published


def test_publishers_started_at_once_one_publishes(store: WeightStore) -> None:
    for round_ in range(10):  # a race: give it several chances to go wrong
        racers = WeightStore(store.r, store.key, f"{store.ns}:r{round_}")
        published = race(racers, 4)
        assert len(published) == 1 and len(racers.versions()) == 1, published


def test_a_lapsed_lease_nobody_took_is_taken_up_again(store: WeightStore) -> None:
    """A stall nobody else waited out, and a Redis that lost its data, cost the holder
    nothing; the token counter never goes back below a token handed out."""
    lease = store.acquire_lease("a", ttl_ms=200)
    assert lease is not None
    time.sleep(0.3)
    assert store.renew_lease(lease) and store.lease_holder() == lease.value
    for key in store.r.scan_iter(f"{store.ns}:*"):
        store.r.delete(key)  # FLUSHALL, or a restart without persistence
    assert publish(store, lease) == 1
    assert int(store.r.get(store.lease_seq)) == lease.token
    store.release_lease(lease)
    assert store.lease_holder() is None
    newer = store.acquire_lease("b", ttl_ms=5_000)
    assert newer is not None and newer.token > lease.token
    assert not store.renew_lease(lease)


@pytest.mark.integration
def test_a_second_trainer_process_waits_for_the_lease_then_takes_over(stack_env, spawn) -> None:
    """Two trainer processes on one stack: the second waits (and says so) while the first
    publishes; when the first stops, the second resumes from its weights and publishes."""
    env = {**stack_env, "FRESHREC_BATCH_MAX_EVENTS": "1000", "FRESHREC_BATCH_WINDOW_MS": "300"}
    client = redis.Redis.from_url(env["FRESHREC_REDIS_URL"])
    FeatureStore(client, env["FRESHREC_NAMESPACE"]).upsert_items(
        [Item(str(i), f"item {i}") for i in range(10)])
    store = WeightStore(client, env["FRESHREC_HMAC_KEY"].encode(), env["FRESHREC_NAMESPACE"])
    send_events(env, 0, 60)
    first = spawn("consumers.trainer", env)
    wait_for(lambda: committed_total(env) == 60, 90, "the first trainer's first version")
    second = spawn("consumers.trainer", env)
    wait_for(lambda: "another trainer holds the publisher lease" in second.output(), 60,
             "the second trainer to wait for the lease")
    send_events(env, 60, 30)
    wait_for(lambda: committed_total(env) == 90, 60, "the first trainer's next version")
    tokens = {store.manifest(v).trained_through["lease_token"] for v in store.versions()}
    assert len(tokens) == 1, f"two trainers published: lease tokens {tokens}"

    assert first.stop() == 0, first.output()  # a clean stop releases the lease
    last_of_first = store.current()
    send_events(env, 90, 30)
    wait_for(lambda: committed_total(env) == 120, 90, "the second trainer's first version")
    taken_over = [store.manifest(v) for v in store.versions() if v > last_of_first]
    assert taken_over and all(m.trained_through["lease_token"] > max(tokens) for m in taken_over)
    assert taken_over[0].parent == last_of_first, "the second trainer did not resume"
    assert sum(m.trained_through["events"] for m in taken_over) == 30
    assert second.p.poll() is None, second.output()
