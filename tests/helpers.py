"""Helpers for the service tests: a real learner that publishes real, signed versions to Redis
(no Kafka involved), the catalog and histories the features consumer would have written, and an
in-process app (lifespan included) pointed at all of it."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict

import redis
import torch

from model.config import ModelConfig
from model.encoder import TextEncoder
from model.events import Interaction, Item
from model.learner import OnlineLearner
from model.serialization import make_delta, to_bytes
from protocol.features import FeatureStore
from protocol.weights import Manifest, WeightStore

HMAC_KEY = "test-hmac-key-" + "k" * 18
API_TOKEN = "test-token-123"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"]


def make_items(n: int = 40, prefix: str = "i") -> list[Item]:
    rnd = random.Random(7)
    return [Item(f"{prefix}{k}", f"{' '.join(rnd.sample(WORDS, 3))} {k}", {"year": 1990 + k % 30})
            for k in range(n)]


def make_events(items: Sequence[Item], users: int = 8, n: int = 120, seed: int = 0,
                t0: float = 1_700_000_000.0) -> list[Interaction]:
    rnd = random.Random(seed)
    return [Interaction(f"u{rnd.randrange(users)}", rnd.choice(items).item_id, t0 + k)
            for k in range(n)]


class Publisher:
    """A real OnlineLearner that publishes signed versions through the real WeightStore."""

    def __init__(self, client: redis.Redis, namespace: str, encoder_path: str,
                 encoder: TextEncoder | None = None, items: Sequence[Item] | None = None,
                 events: Sequence[Interaction] | None = None, key: str = HMAC_KEY,
                 item_tower: str = "mlp", item_bias: bool = False) -> None:
        self.cfg = ModelConfig(encoder_path=encoder_path, dim=16, history_len=8, negatives=16,
                               user_heads=2, replay_size=500, item_tower=item_tower,
                               item_bias=item_bias)
        self.learner = OnlineLearner(self.cfg, encoder or TextEncoder(encoder_path), device="cpu")
        self.store = WeightStore(client, key.encode(), namespace)
        self.items = list(items if items is not None else make_items())
        self.learner.add_items(self.items)
        self._last: tuple[dict[str, torch.Tensor], list[str]] | None = None
        self.last_manifest: Manifest | None = None
        for k in range(0, len(events or []), 40):
            self.learner.learn(list(events[k: k + 40]))  # type: ignore[index]

    @property
    def last_version(self) -> int | None:
        return self.last_manifest.version if self.last_manifest is not None else None

    def learn(self, events: Sequence[Interaction]) -> None:
        self.learner.learn(list(events))

    def blob(self, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
        return to_bytes(tensors if tensors is not None else self.learner.state_tensors(),
                        self.learner.item_ids)

    def publish(self, kind: str = "full", tensors: dict[str, torch.Tensor] | None = None
                ) -> Manifest:
        """Publish the learner's current weights (or `tensors`) as a full snapshot or a delta
        against the previous publish."""
        state = {k: v.clone() for k, v in (tensors if tensors is not None
                                          else self.learner.state_tensors()).items()}
        ids = list(self.learner.item_ids)
        if kind == "delta" and self._last is not None:
            delta, added = make_delta(self._last[0], self._last[1], state, ids)
            blob, parent = to_bytes(delta, added), self.last_manifest
        else:
            kind, blob, parent = "full", to_bytes(state, ids), self.last_manifest
        m = self.store.publish(blob, parent=parent, kind=kind, config=asdict(self.cfg),
                               encoder=self.learner.encoder.identity,
                               trained_through={"produced_ts": [time.time()]})
        self._last, self.last_manifest = (state, ids), m
        return m

    def publish_raw(self, blob: bytes, *, hmac_key: bytes | None = None,
                    hmac_override: str | None = None, sha_of: bytes | None = None) -> int:
        """Write a version by hand (a full snapshot), then move the pointer: for forgeries.

        `hmac_key` signs with another key; `hmac_override` sets the HMAC field verbatim;
        `sha_of` computes the signed sha256 over other bytes than those stored."""
        import hashlib

        r, ns = self.store.r, self.store.ns
        version = int(r.incr(f"{ns}:seq"))
        signed = sha_of if sha_of is not None else blob
        m = Manifest(version, None, "full", asdict(self.cfg), self.learner.encoder.identity,
                     hashlib.sha256(signed).hexdigest(), len(signed), 1, time.time(),
                     {"produced_ts": [time.time()]})
        m = m.sign(hmac_key if hmac_key is not None else self.store.key)
        if hmac_override is not None:
            m = dataclasses.replace(m, hmac=hmac_override)
        r.set(f"{ns}:v:{version}:blob:0", blob)
        r.set(f"{ns}:v:{version}:manifest", json.dumps(asdict(m)))
        self.store.point_to(version)
        return version


def seed_features(client: redis.Redis, namespace: str, items: Sequence[Item],
                  events: Sequence[Interaction]) -> FeatureStore:
    fs = FeatureStore(client, namespace)
    fs.upsert_items(items)
    fs.apply(events)
    return fs


def publish_small(client: redis.Redis, namespace: str, encoder_path: str, encoder) -> Manifest:  # noqa: ANN001
    """20 items and 30 events of 3 users (u0-u2) in the feature store, and one version
    trained on them published: a stack with something to serve."""
    items = make_items(20)
    events = make_events(items, users=3, n=30)
    published = Publisher(client, namespace, encoder_path, encoder, items, events).publish()
    seed_features(client, namespace, items, events)
    return published


def settings(redis_url: str, namespace: str, encoder_path: str, **over):  # noqa: ANN003, ANN201
    from service.settings import ServiceSettings

    base = dict(redis_url=redis_url, namespace=namespace, hmac_key=HMAC_KEY, api_token=API_TOKEN,
                encoder_path=encoder_path, poll_interval_s=0.1,
                kafka_bootstrap="127.0.0.1:1")  # nothing listens on port 1: Kafka is "down"
    base.update(over)
    return ServiceSettings(**base)


def client_for(s):  # noqa: ANN001, ANN201
    """A TestClient for the app with settings `s`; use it as a context manager (lifespan)."""
    from starlette.testclient import TestClient

    from service.app import create_app

    return TestClient(create_app(s), raise_server_exceptions=False)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition",  # noqa: ANN001, ANN201
               interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in a Prometheus exposition text (0.0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in (labels or {}).items()):
            return float(m.group(3))
    return 0.0
