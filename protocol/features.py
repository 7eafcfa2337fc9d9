"""The Redis feature store: user histories, seen-sets, popularity and the item catalog.

Keys under `{ns}:f:` —
  hist:{user}        list of recent item ids, newest last, trimmed to `history_len`
  seen:{user}        set of every item the user interacted with (excluded from results)
                     (both expire `user_ttl_s` after the user's last event: idle users go)
  pop                sorted set of item interaction counts (cold-start fallback)
  items              hash item_id -> item JSON ({"item_id", "text", ...})
  items:log          list of item ids in order of (re)definition; readers keep a cursor
  text:{encoder}     hash item_id -> float32 text features (a shared memo of the encoder)
  applied            hash "topic:partition" -> next offset the features consumer has applied:
                     it moves in the same MULTI/EXEC as the writes, so a replayed record is
                     recognised and skipped (Kafka delivers at least once)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import redis.asyncio

from model.events import Interaction, Item
from protocol.errors import FreshrecError
from protocol.topics import Source

SEEN_READ_MAX = 1_000  # seen ids read per request; beyond that, candidates are checked one by one
HISTORY_READ_MAX = 200  # newest history items read per request (the model reads 20 by default)
TEXT_PAGE = 5_000  # text features read per Redis call (7.7 MB of MiniLM features)


@dataclass(frozen=True)
class UserView:
    """What one request reads of a user: the recent history and a bounded read of the seen-set.
    When `complete` is false the user has seen more than was read; ask `FeatureStore.seen_among`
    about the candidates before excluding."""

    history: list[str]
    seen: set[str]
    complete: bool = True


class FeaturesLost(FreshrecError):
    """Redis no longer holds features that were applied: fetch these partitions again from
    the offsets named ("topic:partition" -> the next offset Redis has applied)."""

    def __init__(self, applied: dict[str, int]) -> None:
        super().__init__(f"features lost past {applied}")
        self.applied = applied


class FeatureStore:
    """Reads and writes of the features that serving uses at once, before any training."""

    def __init__(self, client: redis.Redis, namespace: str = "freshrec",
                 history_len: int = 50, user_ttl_s: int = 0) -> None:
        self.r = client
        self.ns = f"{namespace}:f"
        self.history_len = history_len
        self.user_ttl_s = user_ttl_s  # 0: users never expire

    # ------------------------------------------------------------------ writes (features consumer)
    def apply(self, events: Sequence[Interaction]) -> None:
        """Append events to histories, seen-sets and popularity, in one round trip (each call
        counts: for records from Kafka, use `apply_records`, which applies each once)."""
        pipe = self.r.pipeline(transaction=False)
        self._queue_events(pipe, events)
        pipe.execute()

    def apply_records(self, interactions: Sequence[tuple[Source, Interaction]],
                      items: Sequence[tuple[Source, Item]] = (),
                      skipped: Sequence[Source] = (),
                      gaps_ok: dict[str, int] | None = None) -> int:
        """Apply a poll's records once each: records below their partition's applied offset
        are replays (a crash between apply and commit) and are skipped. The writes and the new
        applied offsets go in one MULTI/EXEC, so a record is applied wholly or not at all.
        `skipped` are the poll's invalid records (in the DLQ): their offsets count as applied.

        A poll that starts past a partition's applied offset means Redis lost what was applied
        (restarted empty, flushed, failed over): `FeaturesLost` names the offsets to fetch
        again from, and nothing is written. `gaps_ok` ("topic:partition" -> offset) accepts a
        gap once after such a rewind (the log itself starts later: retention removed the rest).
        Returns how many interactions were applied."""
        sources = [src for src, _ in interactions] + [src for src, _ in items] + list(skipped)
        if not sources:
            return 0
        key = f"{self.ns}:applied"
        parts = sorted({_partition(src) for src in sources})
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)  # another consumer applying the same partition: retry
                    applied = {p: int(v or 0) for p, v in zip(parts, pipe.hmget(key, parts),
                                                              strict=True)}
                    first: dict[str, int] = {}
                    for src in sources:
                        p = _partition(src)
                        first[p] = min(first.get(p, src.offset), src.offset)
                    lost = {p: applied[p] for p, off in first.items() if off > applied[p]
                            and (gaps_ok or {}).get(p) != applied[p]}
                    if lost:
                        pipe.reset()
                        raise FeaturesLost(lost)
                    events = [e for src, e in interactions
                              if src.offset >= applied[_partition(src)]]
                    fresh_items = [i for src, i in items if src.offset >= applied[_partition(src)]]
                    for src in sources:
                        applied[_partition(src)] = max(applied[_partition(src)], src.offset + 1)
                    pipe.multi()
                    self._queue_items(pipe, fresh_items)
                    self._queue_events(pipe, events)
                    pipe.hset(key, mapping=applied)
                    pipe.execute()
                    return len(events)
                except redis.WatchError:
                    continue

    def applied_offsets(self) -> dict[str, int]:
        """"topic:partition" -> the next offset the features consumer has applied (empty
        after Redis lost its data: then everything is to be applied again)."""
        raw = self.r.hgetall(f"{self.ns}:applied")
        return {_text(k): int(v) for k, v in raw.items()}

    def _queue_events(self, pipe: redis.client.Pipeline, events: Sequence[Interaction]) -> None:
        for e in events:
            pipe.rpush(f"{self.ns}:hist:{e.user_id}", e.item_id)
            pipe.ltrim(f"{self.ns}:hist:{e.user_id}", -self.history_len, -1)
            pipe.sadd(f"{self.ns}:seen:{e.user_id}", e.item_id)
            pipe.zincrby(f"{self.ns}:pop", 1.0, e.item_id)
        if self.user_ttl_s:
            for user in {e.user_id for e in events}:
                pipe.expire(f"{self.ns}:hist:{user}", self.user_ttl_s)
                pipe.expire(f"{self.ns}:seen:{user}", self.user_ttl_s)

    def upsert_items(self, items: Sequence[Item]) -> None:
        """Define or redefine catalog items and log them for readers to pick up."""
        if not items:
            return
        pipe = self.r.pipeline(transaction=False)
        self._queue_items(pipe, items)
        pipe.execute()

    def _queue_items(self, pipe: redis.client.Pipeline, items: Sequence[Item]) -> None:
        for item in items:
            body = {**item.fields, "item_id": item.item_id, "text": item.text}
            pipe.hset(f"{self.ns}:items", item.item_id, json.dumps(body))
            pipe.rpush(f"{self.ns}:items:log", item.item_id)

    def put_text_features(self, encoder: str, feats: dict[str, np.ndarray],
                          replace: bool = False) -> set[str]:
        """Memoise text features. An item that has some already keeps them (the first writer
        wins) unless `replace`; returns the ids that kept them. Every process must use the
        stored features, see `share_text_features`."""
        if not feats:
            return set()
        key = f"{self.ns}:text:{encoder}"
        values = {k: np.asarray(v, np.float32).tobytes() for k, v in feats.items()}
        if replace:
            self.r.hset(key, mapping=values)
            return set()
        pipe = self.r.pipeline(transaction=False)
        for item_id, raw in values.items():
            pipe.hsetnx(key, item_id, raw)
        return {i for i, stored in zip(values, pipe.execute(), strict=True) if not stored}

    # ------------------------------------------------------------------ reads (trainer, service)
    def user_view(self, user_id: str, seen_max: int = SEEN_READ_MAX,
                  history_max: int = HISTORY_READ_MAX) -> UserView:
        """The newest `history_max` history items and at most about `seen_max` seen ids, in one
        round trip: a request's cost does not grow with how much the user has seen, nor with
        how long a history the store keeps (`history_len`)."""
        pipe = self.r.pipeline(transaction=False)
        _queue_view(pipe, self.ns, user_id, seen_max, history_max)
        return _view_of(pipe.execute())

    def seen_among(self, user_id: str, ids: Sequence[str]) -> set[str]:
        """Which of `ids` the user has seen (one SMISMEMBER, however large the seen-set)."""
        if not ids:
            return set()
        return _seen_of(ids, self.r.smismember(f"{self.ns}:seen:{user_id}", list(ids)))

    def user_state(self, user_id: str) -> tuple[list[str], set[str]]:
        """(recent items oldest first, every item seen) in one round trip. Reads the whole
        seen-set: for tools and tests; requests use `user_view`."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lrange(f"{self.ns}:hist:{user_id}", 0, -1)
        pipe.smembers(f"{self.ns}:seen:{user_id}")
        hist, seen = pipe.execute()
        return [h.decode() for h in hist], {s.decode() for s in seen}

    def popular(self, k: int) -> list[tuple[str, float]]:
        return _popular_of(self.r.zrevrange(f"{self.ns}:pop", 0, k - 1, withscores=True))

    def items(self, ids: Sequence[str]) -> dict[str, Item]:
        if not ids:
            return {}
        out = {}
        for item_id, raw in zip(ids, self.r.hmget(f"{self.ns}:items", list(ids)), strict=True):
            if raw is not None:
                body = json.loads(raw)
                text = body.pop("text")
                body.pop("item_id", None)
                out[item_id] = Item(item_id, text, body)
        return out

    def items_since(self, cursor: int, limit: int = 10_000) -> tuple[list[Item], int]:
        """Items (re)defined after `cursor`; returns them and the new cursor."""
        ids = [i.decode() for i in self.r.lrange(f"{self.ns}:items:log", cursor,
                                                 cursor + limit - 1)]
        found = self.items(list(dict.fromkeys(ids)))
        return [found[i] for i in dict.fromkeys(ids) if i in found], cursor + len(ids)

    def items_log_length(self) -> int:
        return int(self.r.llen(f"{self.ns}:items:log"))

    def text_features(self, encoder: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Memoised features of `ids`, read TEXT_PAGE at a time: Redis builds a reply whole
        before sending its first byte, and one HMGET of a 1M-item catalog's features (1.5 GB)
        ran past every client's read timeout (the trainer died at startup, the API never
        caught up)."""
        ids = list(ids)
        key = f"{self.ns}:text:{encoder}"
        out = {}
        for start in range(0, len(ids), TEXT_PAGE):
            page = ids[start: start + TEXT_PAGE]
            out.update((i, np.frombuffer(b, dtype=np.float32))
                       for i, b in zip(page, self.r.hmget(key, page), strict=True)
                       if b is not None)
        return out


def share_text_features(store: FeatureStore, encoder, items: Sequence[Item],
                        write_back: bool = True, progress: bool = False
                        ) -> tuple[dict[str, np.ndarray], set[str]]:
    """Text features for `items`, the same in every process: the memo's where it has them, else
    encoded here, memoised (with `write_back`; the first writer wins) and read back. `encoder` is
    a TextEncoder.

    The memo is the one source of truth because an encoder's output is not a function of the
    text alone: padding to the longest text of a batch, and the thread count, change the last
    bits. A server that used its own features where the trainer learned with others would serve
    scores the trainer never computed. Returns the features and the ids whose features exist
    only here (a read-only user could not store them): look those up again later.
    """
    by_id = {i.item_id: i for i in items}
    feats = store.text_features(encoder.identity, list(by_id))
    missing = [i for i in by_id if i not in feats or feats[i].shape != (encoder.dim,)]
    if not missing:
        return feats, set()
    vecs = encoder.encode([by_id[i].text for i in missing], progress=progress)
    fresh = dict(zip(missing, vecs, strict=True))
    unshared = set(missing)  # ids not known to be stored, by us or by another process
    if write_back:
        try:
            unshared = store.put_text_features(
                encoder.identity, {i: fresh[i] for i in missing if i not in feats})
            store.put_text_features(encoder.identity,  # malformed entries: replace them
                                    {i: fresh[i] for i in missing if i in feats}, replace=True)
        except redis.exceptions.ResponseError:  # a read-only ACL user: the trainer stores them
            pass
    # Another process stored some of them first: use its features, as every process will.
    for item_id, vec in store.text_features(encoder.identity, sorted(unshared)).items():
        if vec.shape == (encoder.dim,):
            fresh[item_id] = vec
            unshared.discard(item_id)
    feats.update(fresh)
    return feats, unshared


def resolve_text_features(store: FeatureStore, encoder, items: Sequence[Item],
                          write_back: bool = True, progress: bool = False
                          ) -> dict[str, np.ndarray]:
    """Text features for `items`, the same in every process (see `share_text_features`)."""
    return share_text_features(store, encoder, items, write_back, progress)[0]


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _partition(src: Source) -> str:
    return f"{src.topic}:{src.partition}"


class UserReads:
    """What a /recommend request reads (`user_view`, `seen_among`, `popular`), awaited on the
    API's event loop through an asyncio Redis client: a request needs no thread of its own
    (service/routes.py). Same keys and answers as `FeatureStore`'s methods of the same names."""

    def __init__(self, client: redis.asyncio.Redis, namespace: str = "freshrec") -> None:
        self.r = client
        self.ns = f"{namespace}:f"

    async def user_view(self, user_id: str, seen_max: int = SEEN_READ_MAX,
                        history_max: int = HISTORY_READ_MAX) -> UserView:
        pipe = self.r.pipeline(transaction=False)
        _queue_view(pipe, self.ns, user_id, seen_max, history_max)
        return _view_of(await pipe.execute())

    async def seen_among(self, user_id: str, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        return _seen_of(ids, await self.r.smismember(f"{self.ns}:seen:{user_id}", list(ids)))

    async def popular(self, k: int) -> list[tuple[str, float]]:
        return _popular_of(await self.r.zrevrange(f"{self.ns}:pop", 0, k - 1, withscores=True))


def _queue_view(pipe: Any, ns: str, user_id: str, seen_max: int, history_max: int) -> None:
    """Queue a user view's two reads on a pipeline (sync or asyncio: the calls are the same)."""
    pipe.lrange(f"{ns}:hist:{user_id}", -history_max, -1)
    pipe.sscan(f"{ns}:seen:{user_id}", 0, count=seen_max)


def _view_of(replies: list[Any]) -> UserView:
    hist, (cursor, seen) = replies
    return UserView([h.decode() for h in hist], {s.decode() for s in seen},
                    complete=int(cursor) == 0)


def _seen_of(ids: Sequence[str], flags: list[Any]) -> set[str]:
    return {i for i, f in zip(ids, flags, strict=True) if f}


def _popular_of(pairs: list[tuple[bytes, float]]) -> list[tuple[str, float]]:
    return [(i.decode(), float(s)) for i, s in pairs]
