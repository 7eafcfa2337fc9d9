"""What the API serves is what the trainer learned: for the same version, the API's ranking of a
history equals the learner's own `rank(history, k, exclude)` — same items, same order, and the
same fp32 scores bit for bit (both run `model.scorer.Scorer`; the bytes in between are fp32
safetensors, and a float32 widened to a Python float survives JSON exactly).

A real OnlineLearner publishes through the real WeightStore into real Redis: a full snapshot,
then items appended to the catalog (the features store the server follows, and the learner) with
deltas carrying new ID rows, then a further delta. A server that followed every version applies
each delta to its own state; a server started afterwards walks the chain back to the snapshot.
Both must match the learner exactly.

The learner gets its items' text features the way the trainer does (through the shared memo in
Redis), and the first server logs in as docker-compose's read-only `api` user. The encoder's last
bits depend on the batch an item was encoded in (padding) and on the thread count, so a server
that encoded an item itself before the trainer stored it must adopt the trainer's features.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
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
from starlette.testclient import TestClient

from model.events import Interaction, Item
from protocol.features import FeatureStore, resolve_text_features, share_text_features

K = 20  # about half the catalog: deep enough for the order below the top to matter
USERS = [f"u{n}" for n in range(6)]
ACL_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "redis" / "users.acl.template"


@pytest.fixture
def api_redis_url(redis_url: str, namespace: str) -> Iterator[str]:
    """A Redis URL for a user with docker-compose's read-only `api` rule, in this namespace."""
    rule = next(line for line in ACL_TEMPLATE.read_text().splitlines()
                if line.startswith("user api "))
    password = secrets.token_hex(16)
    user = f"{namespace}-api"
    rules = [f">{password}" if word.startswith("#") else word.replace("@NS@", namespace)
             for word in rule.split()[2:]]
    r = redis.Redis.from_url(redis_url)
    r.execute_command("ACL", "SETUSER", user, *rules)
    url = urlsplit(redis_url)
    yield urlunsplit(url._replace(netloc=f"{user}:{password}@{url.hostname}:{url.port or 6379}"))
    r.execute_command("ACL", "DELUSER", user)


def new_items(start: int, n: int) -> list[Item]:
    """Items appended later; texts of different lengths, so a batch of them is padded."""
    return [Item(f"new{k}", f"late arrival {k}" + " zulu" * (k % 4), {})
            for k in range(start, start + n)]


def trainer_adds(pub: Publisher, fs: FeatureStore, items: Sequence[Item]) -> None:
    """What consumers/trainer.py `Trainer.add_items` does with the items of one poll."""
    feats = resolve_text_features(fs, pub.learner.encoder, items)
    pub.learner.set_text_features(feats, {i.item_id: i.text for i in items})


def learn(pub: Publisher, fs: FeatureStore, events: Sequence[Interaction]) -> None:
    """Events reach the features store (histories the server reads) and the learner alike."""
    fs.apply(events)
    for k in range(0, len(events), 40):
        pub.learn(events[k: k + 40])


def wait_served(c: TestClient, version: int, catalog_items: int) -> None:
    """Until the server serves `version` built over the whole catalog (a catalog item pulled
    after the swap rebuilds the snapshot under the same version number)."""
    def ready() -> bool:
        m = c.get("/model").json()
        return m["version"] == version and m["catalog_items"] == catalog_items

    wait_until(ready, 20, f"version {version} over {catalog_items} catalog items")


def served_columns(c: TestClient) -> torch.Tensor:
    """A copy of the served linear Scorer's per-item columns (N, k + 1 + d)."""
    return c.app.state.holder.current.scorer.cols.clone()  # type: ignore[attr-defined]


def built_from_rows(c: TestClient) -> float:
    """Ranking views this process built from the served one (linear tower, row by row)."""
    return metric_value(c.get("/metrics").text, "freshrec_model_builds_total", {"how": "rows"})


def scored(body: dict) -> list[tuple[str, float]]:
    return [(s["item_id"], s["score"]) for s in body["items"]]


def explain(served: list[tuple[str, float]], learned: list[tuple[str, float]]) -> str:
    """A failure message that says how far apart the two rankings are."""
    common = dict(learned).keys() & dict(served).keys()
    worst = max((abs(dict(served)[i] - dict(learned)[i]) for i in common), default=float("nan"))
    return (f"served {[i for i, _ in served]}\nlearned {[i for i, _ in learned]}\n"
            f"largest score difference on common items: {worst!r}")


Ranking = list[tuple[str, float]]


def cases(c: TestClient, pub: Publisher, fs: FeatureStore, version: int,
          histories: Sequence[Sequence[str]]) -> Iterator[tuple[str, Ranking, Ranking]]:
    """(request, served, learned) for POST /recommend with and without the API's exclusions,
    and for GET /recommend (history and seen-set from the features store) of every user."""
    for history in histories:
        top = [i for i, _ in pub.learner.rank(history, 3)]
        for extra, exclude_history in (([], True), ([], False), (top, True)):
            body = {"history": list(history), "k": K, "exclude": extra,
                    "exclude_history": exclude_history}
            got = c.post("/recommend", json=body)
            assert got.status_code == 200, got.text
            assert got.json()["model_version"] == version and got.json()["source"] == "model"
            exclude: Collection[str] = set(extra) | (set(history) if exclude_history else set())
            yield f"POST {body}", scored(got.json()), pub.learner.rank(history, K, exclude)
    for user in USERS:
        history, seen = fs.user_state(user)
        assert len(history) > pub.cfg.history_len  # the server must cut it where the learner does
        for exclude_seen in (True, False):
            got = c.get("/recommend", params={"user_id": user, "k": K,
                                              "exclude_seen": exclude_seen})
            assert got.status_code == 200, got.text
            assert got.json()["model_version"] == version
            yield (f"GET user {user}, exclude_seen={exclude_seen}", scored(got.json()),
                   pub.learner.rank(history, K, seen if exclude_seen else set()))


def differences(c: TestClient, pub: Publisher, fs: FeatureStore, version: int,
                histories: Sequence[Sequence[str]]) -> list[str]:
    """Every request whose served ranking is not the learner's, explained."""
    out = []
    for what, served, learned in cases(c, pub, fs, version, histories):
        assert learned, what  # a comparison of two empty rankings would prove nothing
        if served != learned:
            out.append(f"version {version}, {what}\n{explain(served, learned)}")
    return out


def check(c: TestClient, pub: Publisher, fs: FeatureStore, version: int, catalog_items: int,
          histories: Sequence[Sequence[str]]) -> None:
    """Once `version` is served over the whole catalog, every ranking is the learner's."""
    wait_served(c, version, catalog_items)
    diffs = differences(c, pub, fs, version, histories)
    assert not diffs, f"{len(diffs)} served rankings differ from the learner's; " \
                      f"the first: {diffs[0]}"


@pytest.mark.parametrize(("item_tower", "item_bias"),
                         [("mlp", False), ("linear", False), ("mlp", True), ("linear", True)])
def test_served_ranking_equals_the_learners(redis_url: str, api_redis_url: str, namespace: str,
                                            tiny_encoder_path: str, tiny_encoder,  # noqa: ANN001
                                            item_tower: str, item_bias: bool) -> None:
    """`linear`: the server builds each delta's Scorer from the one it serves, the learner its
    own from its previous one; both must still equal each other exactly. `item_bias`: the
    per-item offset rides in the ID rows (one more column) and is served the same way."""
    r = redis.Redis.from_url(redis_url)
    items = make_items(40)
    pub = Publisher(r, namespace, tiny_encoder_path, tiny_encoder, items=[],
                    item_tower=item_tower, item_bias=item_bias)
    fs = seed_features(r, namespace, items, [])
    trainer_adds(pub, fs, items)
    learn(pub, fs, make_events(items, users=len(USERS), n=160))
    assert pub.cfg.history_len == 8
    long = [f"i{k}" for k in range(3, 40, 3)]  # 13 items: longer than history_len
    histories: list[list[str]] = [[], ["i5"], ["i1", "i2", "i3"], long]
    late1, late2 = new_items(0, 4), new_items(4, 3)

    with client_for(settings(api_redis_url, namespace, tiny_encoder_path)) as c:
        full = pub.publish()
        assert full.kind == "full"
        old_table = pub.learner.state_tensors()["id_emb"].clone()
        check(c, pub, fs, full.version, 40, histories)

        # Items appended, then learned: the delta carries their new ID rows. The server sees
        # them first and, read-only, encodes them itself in one batch; the trainer gets them
        # one poll each and stores its own features in the memo.
        fs.upsert_items(late1)
        wait_served(c, full.version, 44)
        for item in late1:
            trainer_adds(pub, fs, [item])
        # Before any version has learned them they are served from their text alone; the
        # server adopts the trainer's features within a poll.
        histories += [["new0"], [*long, "new1", "new2"]]
        wait_until(lambda: not differences(c, pub, fs, full.version, histories), 10,
                   "the server to adopt the text features the trainer stored")
        check(c, pub, fs, full.version, 44, histories)
        learn(pub, fs, make_events(items + late1, users=len(USERS), n=80, seed=1,
                                   t0=1_700_001_000.0))
        row_builds = built_from_rows(c)
        served = served_columns(c) if item_tower == "linear" else None
        d1 = pub.publish("delta")
        assert d1.kind == "delta" and d1.parent == full.version
        check(c, pub, fs, d1.version, 44, histories)
        if item_tower == "linear":  # else this would prove nothing about the row-by-row path
            assert built_from_rows(c) > row_builds, "the delta was not applied row by row"
            # exactly the rows whose ID row the delta changed (the 4 appended ones among them,
            # where learned) moved in the served columns; nothing else did
            new_table = pub.learner.state_tensors()["id_emb"]
            was = torch.zeros_like(new_table)
            was[: len(old_table)] = old_table
            want = (new_table != was).any(dim=1).nonzero().flatten()
            moved = (served_columns(c) != served).any(dim=1).nonzero().flatten()
            assert 0 < len(want) < len(new_table) and torch.equal(moved, want)

        # A further delta that learns more and appends items it has not learned (zero ID rows:
        # served from their text alone, by the learner and the server alike). This time the
        # trainer stores their features before the server hears of them.
        learn(pub, fs, make_events(items + late1, users=len(USERS), n=80, seed=2,
                                   t0=1_700_002_000.0))
        trainer_adds(pub, fs, late2)
        fs.upsert_items(late2)
        d2 = pub.publish("delta")
        assert d2.kind == "delta" and d2.parent == d1.version
        histories += [["new4", "i7"]]
        check(c, pub, fs, d2.version, 47, histories)

        # The periodic full snapshot: on the served item order, so still built row by row
        # (the rows its ID table changed), and still the learner's.
        learn(pub, fs, make_events(items + late1, users=len(USERS), n=80, seed=5,
                                   t0=1_700_002_500.0))
        row_builds = built_from_rows(c)
        snap = pub.publish("full")
        check(c, pub, fs, snap.version, 47, histories)
        if item_tower == "linear":
            assert built_from_rows(c) > row_builds, "a full snapshot on the lineage was rebuilt"

    # More deltas while no server runs; a fresh server must reach the same state from the chain.
    learn(pub, fs, make_events(items + late1 + late2, users=len(USERS), n=80, seed=3,
                               t0=1_700_003_000.0))
    pub.publish("delta")
    learn(pub, fs, make_events(items + late1 + late2, users=len(USERS), n=80, seed=4,
                               t0=1_700_004_000.0))
    d4 = pub.publish("delta")
    with client_for(settings(redis_url, namespace, tiny_encoder_path)) as c:
        check(c, pub, fs, d4.version, 47, histories)
        assert c.get("/model").json()["swaps"] == 1  # straight to the newest, via the chain


def test_processes_that_both_missed_the_memo_use_the_first_stored_features(
        redis_url: str, namespace: str, tiny_encoder) -> None:  # noqa: ANN001
    """The race the memo settles: the trainer and a server both look an item up before either
    has stored it, and encode it in different batches. The second to store must adopt the
    first's features, or the two would score that item differently forever."""

    class LookedEarly(FeatureStore):
        """Its first memo lookup happens before the other process stored anything."""

        looked = False

        def text_features(self, encoder: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
            if not self.looked:
                self.looked = True
                return {}
            return super().text_features(encoder, ids)

    r = redis.Redis.from_url(redis_url)
    items = new_items(0, 4)
    own = tiny_encoder.encode([i.text for i in items])  # what this batch encodes to
    # The other process encoded new1 in another batch (or on other hardware): its bits differ
    # from this batch's. Whether they do here depends on the BLAS build and thread count, so
    # the other process's result is made to differ in the last bits on purpose.
    other = np.nextafter(own[1], np.float32(np.inf)).astype(np.float32)
    FeatureStore(r, namespace).put_text_features(tiny_encoder.identity, {"new1": other})
    first = {"new1": other}
    feats, unshared = share_text_features(LookedEarly(r, namespace), tiny_encoder, items)
    assert not unshared
    assert np.array_equal(feats["new1"], first["new1"])
    assert all(np.array_equal(feats[i.item_id], own[k]) for k, i in enumerate(items) if k != 1)
