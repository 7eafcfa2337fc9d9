"""Invariant 2: a version that fails verification (HMAC, hash, shape, non-finite values) is never
served; the server keeps serving the last good version and says so in its metrics and /model.

Each forged version sits at the pointer, exactly where a real trainer's version would; the
server must refuse it, keep answering with the previous version, count the refusal under the
right reason, and still pick up the next good version."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import redis
import torch
from helpers import (
    Publisher,
    client_for,
    make_events,
    make_items,
    metric_value,
    seed_features,
    settings,
    wait_until,
)

FAILURES = "freshrec_model_swap_failures_total"


@pytest.fixture
def served(redis_url: str, namespace: str, tiny_encoder_path: str,
           tiny_encoder) -> Iterator[tuple[object, Publisher, int]]:  # noqa: ANN001
    r = redis.Redis.from_url(redis_url)
    items = make_items(30)
    events = make_events(items, users=5, n=80)
    pub = Publisher(r, namespace, tiny_encoder_path, tiny_encoder, items, events)
    seed_features(r, namespace, items, events)
    good = pub.publish().version
    with client_for(settings(redis_url, namespace, tiny_encoder_path)) as c:
        wait_until(lambda: c.get("/model").json()["version"] == good, 10, "the good version")
        yield c, pub, good


def forged_hmac(pub: Publisher) -> int:
    """(a) Someone without the key writes a manifest and moves the pointer."""
    return pub.publish_raw(pub.blob(), hmac_override="0" * 64)


def signed_with_other_key(pub: Publisher) -> int:
    """(a') A well-formed HMAC, made with another key."""
    return pub.publish_raw(pub.blob(), hmac_key=b"not-the-server-key-at-all")


def altered_blob(pub: Publisher) -> int:
    """(b) Correctly signed manifest, but the stored bytes were changed afterwards: still a
    readable safetensors file (a weight changed), so only the signed sha256 can catch it."""
    blob = pub.blob()
    tampered = bytearray(blob)
    tampered[-3] ^= 0x40
    from model.serialization import from_bytes

    from_bytes(bytes(tampered))  # parses fine: the tampering is invisible without the hash
    return pub.publish_raw(bytes(tampered), sha_of=blob)


def nan_tensor(pub: Publisher) -> int:
    """(c) Correctly signed, through the real publish path, but a weight is NaN."""
    t = {k: v.clone() for k, v in pub.learner.state_tensors().items()}
    t["adapter.proj.weight"][0, 0] = float("nan")
    return pub.publish(tensors=t).version


def inf_in_id_table(pub: Publisher) -> int:
    """(c') Correctly signed; an item-ID row is +inf."""
    t = {k: v.clone() for k, v in pub.learner.state_tensors().items()}
    t["id_emb"][3] = float("inf")
    return pub.publish(tensors=t).version


def wrong_shape(pub: Publisher) -> int:
    """(d) Correctly signed, finite, but a tensor does not fit the architecture."""
    t = {k: v.clone() for k, v in pub.learner.state_tensors().items()}
    w = t["adapter.proj.weight"]
    t["adapter.proj.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)
    return pub.publish(tensors=t).version


def missing_tensor(pub: Publisher) -> int:
    """(d') Correctly signed, but a tensor of the user tower is missing."""
    t = {k: v.clone() for k, v in pub.learner.state_tensors().items()}
    del t["user.out.weight"]
    return pub.publish(tensors=t).version


def garbage_manifest(pub: Publisher) -> int:
    """(e) The manifest is not even JSON: refused once (not retried at every poll)."""
    r, ns = pub.store.r, pub.store.ns
    version = int(r.incr(f"{ns}:seq"))
    r.set(f"{ns}:v:{version}:blob:0", pub.blob())
    r.set(f"{ns}:v:{version}:manifest", b"\x00not json{")
    pub.store.point_to(version)
    return version


CASES: list[tuple[Callable[[Publisher], int], str]] = [
    (forged_hmac, "bad_hmac"),
    (signed_with_other_key, "bad_hmac"),
    (altered_blob, "bad_sha256"),
    (nan_tensor, "non_finite"),
    (inf_in_id_table, "non_finite"),
    (wrong_shape, "bad_shape"),
    (missing_tensor, "bad_shape"),
    (garbage_manifest, "bad_manifest"),
]


@pytest.mark.parametrize(("forge", "reason"), CASES, ids=[f.__name__ for f, _ in CASES])
def test_bad_version_is_refused_and_last_good_keeps_serving(served, forge, reason: str) -> None:  # noqa: ANN001
    c, pub, good = served
    before = metric_value(c.get("/metrics").text, FAILURES, {"reason": reason})

    # Watch every answer while the forged version sits at the pointer.
    seen: set[int] = set()
    errors: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            resp = c.get("/recommend", params={"user_id": "u1", "k": 5})
            if resp.status_code != 200:
                errors.append(resp.status_code)
            else:
                seen.add(resp.json()["model_version"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        bad = forge(pub)
        assert bad > good
        refused = wait_until(lambda: c.get("/model").json()["refused_versions"].get(str(bad)),
                             10, f"version {bad} to be refused")
        # A few more poll rounds: the refusal is final, not retried into a later swap.
        pub.store.point_to(bad)
        for _ in range(3):
            c.get("/healthz")
            threading.Event().wait(0.1)
    finally:
        stop.set()
        watcher.join()

    assert refused == reason
    assert errors == []
    assert seen == {good}, f"served {seen}; only {good} is good"
    model = c.get("/model").json()
    assert model["version"] == good and model["swaps"] == 1
    text = c.get("/metrics").text
    assert metric_value(text, FAILURES, {"reason": reason}) == before + 1
    assert metric_value(text, "freshrec_model_version") == good
    assert c.get("/readyz").status_code == 200
    body = c.get("/recommend", params={"user_id": "u1"}).json()
    assert body["model_version"] == good and len(body["items"]) == 10

    # The trainer's next good version is picked up again.
    pub.learn(make_events(pub.items, users=5, n=20, seed=11))
    nxt = pub.publish().version
    wait_until(lambda: c.get("/recommend", params={"user_id": "u1"}).json()["model_version"]
               == nxt, 10, f"good version {nxt}")
    model = c.get("/model").json()
    assert model["swaps"] == 2 and model["refused_versions"] == {str(bad): reason}


def test_refusals_accumulate_and_recovery(served) -> None:  # noqa: ANN001
    """All the forgeries in a row, each on top of the previous: the first good version keeps
    serving throughout; every one is listed with its reason; then a good one is served."""
    c, pub, good = served
    text = c.get("/metrics").text
    before = {r: metric_value(text, FAILURES, {"reason": r}) for _, r in CASES}
    expected: dict[str, str] = {}
    for forge, reason in CASES:
        bad = forge(pub)
        expected[str(bad)] = reason
        wait_until(lambda b=bad: str(b) in c.get("/model").json()["refused_versions"], 10,
                   f"version {bad} to be refused")
        assert c.get("/recommend", params={"user_id": "u2"}).json()["model_version"] == good
    assert c.get("/model").json()["refused_versions"] == expected
    text = c.get("/metrics").text
    for r in set(before):
        want = before[r] + sum(1 for _, x in CASES if x == r)
        assert metric_value(text, FAILURES, {"reason": r}) == want, r

    nxt = pub.publish().version
    wait_until(lambda: c.get("/model").json()["version"] == nxt, 10, f"good version {nxt}")
    assert c.get("/recommend", params={"user_id": "u2"}).json()["model_version"] == nxt


def test_a_linear_delta_with_a_non_finite_row_is_refused(redis_url: str, namespace: str,
                                                         tiny_encoder_path: str,
                                                         tiny_encoder) -> None:  # noqa: ANN001
    """With the linear item tower a delta is checked only in the rows it changed (the rest were
    checked in the version it is built on): a NaN there is still refused, as non_finite."""
    r = redis.Redis.from_url(redis_url)
    items = make_items(30)
    events = make_events(items, users=5, n=80)
    pub = Publisher(r, namespace, tiny_encoder_path, tiny_encoder, items, events,
                    item_tower="linear")
    seed_features(r, namespace, items, events)
    good = pub.publish().version
    with client_for(settings(redis_url, namespace, tiny_encoder_path)) as c:
        wait_until(lambda: c.get("/model").json()["version"] == good, 10, "the good version")
        before = metric_value(c.get("/metrics").text, FAILURES, {"reason": "non_finite"})
        t = pub.learner.state_tensors()
        t["id_emb"] = t["id_emb"].clone()
        t["id_emb"][7, 3] = float("nan")
        bad = pub.publish("delta", tensors=t)
        assert bad.kind == "delta"
        refused = wait_until(lambda: c.get("/model").json()["refused_versions"].get(
            str(bad.version)), 10, f"version {bad.version} to be refused")
        assert refused == "non_finite"
        assert c.get("/model").json()["version"] == good
        text = c.get("/metrics").text
        assert metric_value(text, FAILURES, {"reason": "non_finite"}) == before + 1
        body = c.get("/recommend", params={"user_id": "u1"}).json()
        assert body["model_version"] == good and len(body["items"]) == 10
