"""The Redis weight store: immutable, signed, versioned weights with a pointer to the newest.

Keys under `{ns}:w:` —
  seq                 INCR counter handing out version numbers
  epoch               random id of this store's history, created when the history is empty
  v:{n}:manifest      JSON manifest (immutable, SET NX)
  v:{n}:blob:{i}      safetensors bytes, chunk i (immutable, SET NX)
  versions            sorted set of live versions (for retention and rollback)
  current             the version servers should serve
  lease               "{token}:{owner}" of the one publisher allowed now (SET NX PX, renewed)
  lease:token         the newest fencing token handed out (written with the lease it names)
  rollback            the newest operator rollback: signed JSON record (version, digest, token)
and the pub/sub channel `{ns}:w:published`. The pointer moves together with the notice in one
MULTI/EXEC; subscribers also poll `current`, because pub/sub loses messages while disconnected.

A manifest carries an HMAC (key from the environment, never stored in Redis) over all its other
fields, among them the blob's sha256, so neither the blob nor the metadata can be swapped.

Version numbers alone do not identify a version: a Redis that lost its data hands them out
again. So a manifest also names its epoch (the store's history) and its parent's digest (the
sha256 of the parent's signed manifest, which covers the parent's blob hash and, in turn, its
own parent's digest): a chain can neither loop nor splice into another history. A delta must
have its parent in the same epoch; a publisher whose parent is gone gets `StaleParent` and
publishes a full snapshot instead.

One publisher at a time: a publisher takes the lease (`acquire_lease`) and renews it; every
acquisition gets a larger fencing token. The transaction that moves the pointer WATCHes the
lease and runs only while the publisher's token is still the current one, so a zombie whose
lease expired and passed on gets `LeaseLost` and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, overload

import redis
import torch

from model.scorer import ColumnStore
from model.serialization import ID_TABLE, WeightsError, from_bytes
from protocol.errors import LeaseLost, VerificationError

CHUNK_BYTES = 4 * 1024 * 1024
# Fields added to the manifest later; they are signed only when set, so manifests written before
# them keep verifying (and stripping a set one breaks the HMAC, since it was signed).
LATER_FIELDS = ("parent_digest", "epoch", "checkpoint")


class StaleParent(WeightsError):
    """A delta's parent is not the stored version of that number (the store lost its history,
    or another publisher moved on): publish a full snapshot instead."""


@dataclass(frozen=True)
class Manifest:
    """Everything about a version except its bytes."""

    version: int
    parent: int | None  # the version this one was trained from (None for the first)
    kind: str  # "full" or "delta" (delta: only what changed since `parent`)
    config: dict[str, Any]  # ModelConfig as a dict
    encoder: str  # base-encoder identity; adapters only make sense on top of it
    sha256: str
    size: int
    chunks: int
    created_at: float
    trained_through: dict[str, Any] = field(default_factory=dict)  # offsets, event/produce times
    hmac: str = ""
    parent_digest: str | None = None  # digest() of the parent's manifest (None: no parent/legacy)
    epoch: str = ""  # the store history this version belongs to ("" before epochs existed)
    # a delta may carry the whole state too, for readers that do not hold its parent:
    # {"sha256", "size", "chunks"} of that snapshot's bytes (None: none)
    checkpoint: dict[str, Any] | None = None

    def signed_payload(self) -> bytes:
        body = asdict(self)
        body.pop("hmac")
        for name in LATER_FIELDS:
            if body[name] in (None, ""):
                body.pop(name)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """sha256 of the signed content: names this exact version (and, through the blob hash
        and the parent digest it covers, its whole chain), whatever number it carries."""
        return hashlib.sha256(self.signed_payload()).hexdigest()

    def sign(self, key: bytes) -> Manifest:
        digest = hmac.new(key, self.signed_payload(), hashlib.sha256).hexdigest()
        return Manifest(**{**asdict(self), "hmac": digest})

    def verify(self, key: bytes) -> None:
        expected = hmac.new(key, self.signed_payload(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self.hmac):
            raise VerificationError("bad_hmac", f"version {self.version}: HMAC does not verify")


@dataclass(frozen=True)
class Lease:
    """The right to publish into one store, held by one publisher at a time. `token` is a
    fencing token: each acquisition gets a larger one, so a lease that passed on stays lost."""

    token: int
    owner: str  # who holds it, for people reading Redis and logs
    ttl_ms: int  # it expires this long after its last renewal

    @property
    def value(self) -> str:
        return f"{self.token}:{self.owner}"


class ItemIds(Sequence[str]):
    """The names of an ID table's rows: the first `n` of an append-only list that successive
    versions of one lineage share, so a delta that appends names costs what it appends (a copy
    of a million names, and freeing the old one, is tens of ms). Reads like a list."""

    __slots__ = ("_names", "_n")

    def __init__(self, names: list[str], n: int | None = None) -> None:
        self._names, self._n = names, len(names) if n is None else n

    def extended(self, added: Sequence[str]) -> ItemIds:
        """These names plus `added`, sharing the list when nobody extended it past ours yet."""
        if len(self._names) != self._n:  # a version we never served appended: copy, O(N) once
            return ItemIds(self._names[: self._n] + list(added))
        self._names.extend(added)
        return ItemIds(self._names, len(self._names))

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):  # O(len of the slice), not of the names
            r = range(self._n)[i]
            return self._names[r.start:r.stop] if r.step == 1 else [self._names[j] for j in r]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._names[i % self._n]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names[: self._n]) if len(self._names) != self._n else \
            iter(self._names)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ItemIds):
            other = other[:]
        return isinstance(other, list) and len(other) == self._n and self[:] == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ItemIds({self._n} names)"


@dataclass(frozen=True)
class LoadedVersion:
    """A verified, fully materialised version (deltas applied).

    `tensors[ID_TABLE]` is a view into a buffer of the store's left-right ID-table pool (see
    `WeightStore.load`): it stays valid while that tensor object is referenced (this
    LoadedVersion holds it); a tensor sliced from it does not keep it valid, so copy rows out.
    """

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    item_ids: Sequence[str]  # ItemIds from `load`: shared with the other versions of a lineage
    # ID-table rows (appended ones included, ascending) in which this version differs from the
    # `have` it was loaded from by deltas alone; None when it was loaded from a full snapshot
    # (then compare tables if needed). Reported by the store, so no reader re-reads blobs.
    changed_rows: torch.Tensor | None = field(default=None, compare=False)
    _store: ColumnStore | None = field(default=None, repr=False, compare=False)


class WeightStore:
    """Publish and fetch versions. Readers verify everything before trusting a byte."""

    def __init__(self, client: redis.Redis, key: bytes, namespace: str = "freshrec",
                 keep: int = 20) -> None:
        self.r = client
        self.key = key
        self.ns = f"{namespace}:w"
        self.keep = keep
        self.channel = f"{self.ns}:published"
        self.lease_key = f"{self.ns}:lease"
        self.lease_seq = f"{self.ns}:lease:token"
        self._heads: dict[int, tuple[int | None, str, str, int]] = {}  # see `_head`
        self._heads_epoch = ""

    # ------------------------------------------------------------------ the publisher lease
    def acquire_lease(self, owner: str, ttl_ms: int) -> Lease | None:
        """Take the publisher lease with the next fencing token if nobody holds it; None while
        another publisher holds it (or took it at the same moment). The token and the lease
        are written in one MULTI/EXEC, so the newest token is always the holder's."""
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.lease_key, self.lease_seq)
                if pipe.exists(self.lease_key):
                    return None
                lease = Lease(int(pipe.get(self.lease_seq) or 0) + 1, owner, ttl_ms)
                pipe.multi()
                pipe.set(self.lease_seq, lease.token)
                pipe.set(self.lease_key, lease.value, nx=True, px=ttl_ms)
                _, taken = pipe.execute()
            except redis.WatchError:  # another publisher got there first
                return None
        return lease if taken else None

    def renew_lease(self, lease: Lease) -> bool:
        """Extend `lease` by its ttl; False if it is lost (another publisher took it)."""
        return self._fenced(lease, lambda pipe: None)

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up (a clean shutdown), so the next publisher need not wait it out."""
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.lease_key)
                if _text(pipe.get(self.lease_key)) == lease.value:
                    pipe.multi()
                    pipe.delete(self.lease_key)
                    pipe.execute()
            except redis.WatchError:
                pass  # it changed hands meanwhile: not ours to release

    def lease_holder(self) -> str | None:
        """"{token}:{owner}" of the current lease, if any."""
        return _text(self.r.get(self.lease_key))

    def _fenced(self, lease: Lease | None, writes: Callable[[Any], object],
                tries: int = 3) -> bool:
        """Queue `writes` in one MULTI/EXEC that runs only if `lease` is the current lease (and
        renews it), or, without a lease, if no publisher holds one. False, with nothing
        written, otherwise. A lease that lapsed is taken up again while nobody took a newer
        token (a stall nobody else waited out is forgiven; so is a Redis that lost its data,
        whose token counter is then set back up to the lease's)."""
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.lease_key)
                held = _text(pipe.get(self.lease_key))
                newest: int | None = None  # the newest token, read only for a lapsed lease
                if lease is None:
                    current = held is None
                elif held == lease.value:
                    current = True
                else:  # lapsed: ours again only if nobody has taken a newer token since
                    pipe.watch(self.lease_seq)
                    newest = int(pipe.get(self.lease_seq) or 0)
                    current = held is None and newest <= lease.token
                if not current:
                    return False
                pipe.multi()
                if lease is not None:
                    pipe.set(self.lease_key, lease.value, px=lease.ttl_ms)
                    if newest is not None and newest < lease.token:
                        pipe.set(self.lease_seq, lease.token)  # Redis lost it: never again
                writes(pipe)
                pipe.execute()
            except redis.WatchError:  # the lease key changed between the check and EXEC: look
                # again (it may only have expired: a stalled holder's lapse, nobody else's)
                return tries > 1 and self._fenced(lease, writes, tries - 1)
        return True

    # ------------------------------------------------------------------ writing
    def epoch(self) -> str:
        """The id of this store's history, created (once, `SET NX`) when there is none: after
        Redis lost its data the next publish starts a new epoch."""
        key = f"{self.ns}:epoch"
        self.r.set(key, secrets.token_hex(8), nx=True)
        raw = self.r.get(key)
        return raw.decode() if isinstance(raw, bytes) else str(raw or "")

    def extends(self, parent: Manifest) -> bool:
        """Whether a delta on top of `parent` may be published: it is still the stored version
        of its number, in the current epoch."""
        raw = self._raw_manifest(parent.version)
        return (raw is not None and parent.epoch == self.epoch()
                and _digest_of(raw) == parent.digest())

    def publish(self, blob: bytes, *, parent: Manifest | int | None, kind: str,
                config: dict[str, Any], encoder: str, trained_through: dict[str, Any],
                lease: Lease | None = None, checkpoint: bytes | None = None) -> Manifest:
        """Store a new immutable version, then move the pointer and notify, atomically.

        `parent` is the manifest the weights were trained from. (A bare number is accepted for
        older callers; then the stored manifest of that number is taken as the parent.) A delta
        whose parent is not the stored version in this epoch raises `StaleParent`; a full
        snapshot whose parent is from another epoch is published without a parent.

        `lease` is the publisher lease; the pointer moves only while it is current (checked in
        the same transaction), else `LeaseLost` and the version's keys are removed again.
        Without a lease, publishing works only while no publisher holds one.

        `checkpoint`, with a delta: the whole state of this version too (a full snapshot's
        bytes), stored beside the delta. A reader holding the parent applies the delta (what
        changed); one that does not starts from the newest checkpoint on the chain instead of
        walking back to the last full snapshot. So snapshots for late joiners cost the servers
        that follow the chain nothing (a full load was ~220 ms at 100k items, the slowest swap)."""
        if kind not in ("full", "delta"):
            raise ValueError("kind must be 'full' or 'delta'")
        if not self._fenced(lease, lambda pipe: None):  # fail before writing anything
            raise LeaseLost(self._lost_message(lease))
        epoch = self.epoch()
        parent_m = (_manifest_or_none(self._raw_manifest(parent)) if isinstance(parent, int)
                    else parent)
        same_history = parent_m is not None and self.extends(parent_m)
        if kind == "delta" and not same_history:
            named = parent_m.version if parent_m is not None else parent
            raise StaleParent(f"parent {named} is not in this store's history (epoch {epoch})")
        if not same_history:
            if parent_m is not None:
                self._numbers_continue_from(parent_m.version)
            parent_m = None
        if kind != "delta":
            checkpoint = None  # a full snapshot is its own
        version = int(self.r.incr(f"{self.ns}:seq"))
        chunks = _chunks(blob)
        ckpt_chunks = _chunks(checkpoint) if checkpoint is not None else []
        ckpt = None if checkpoint is None else {
            "sha256": hashlib.sha256(checkpoint).hexdigest(), "size": len(checkpoint),
            "chunks": len(ckpt_chunks)}
        digest = hashlib.sha256(blob).hexdigest()
        pipe = self.r.pipeline(transaction=False)
        for i, chunk in enumerate(chunks):
            pipe.set(f"{self.ns}:v:{version}:blob:{i}", chunk, nx=True)
        for i, chunk in enumerate(ckpt_chunks):
            pipe.set(f"{self.ns}:v:{version}:ckpt:{i}", chunk, nx=True)
        # The bytes first, then the manifest that names them (a reader that finds the manifest
        # finds its bytes), stamped when they are stored: `created_at` is the moment the version
        # is in Redis, so a server's swap delay does not count the trainer's writes (a 1M-item
        # checkpoint takes a while); freshness, from the events' production, still does.
        written = all(pipe.execute())
        manifest = Manifest(version, parent_m.version if parent_m else None, kind, config, encoder,
                            digest, len(blob), len(chunks), time.time(), trained_through,
                            parent_digest=parent_m.digest() if parent_m else None,
                            epoch=epoch, checkpoint=ckpt).sign(self.key)
        if not (written and self.r.set(f"{self.ns}:v:{version}:manifest",
                                       json.dumps(asdict(manifest)), nx=True)):
            raise WeightsError(f"version {version} already exists; versions are immutable")
        if not self._fenced(lease, lambda pipe: self._point(pipe, version)):
            self.r.delete(*self._keys(version, len(chunks), len(ckpt_chunks)))
            raise LeaseLost(self._lost_message(lease))
        self.prune()
        return manifest

    def _keys(self, version: int, chunks: int, ckpt_chunks: int) -> list[str]:
        """Every key of a stored version."""
        return [f"{self.ns}:v:{version}:manifest",
                *(f"{self.ns}:v:{version}:blob:{i}" for i in range(chunks)),
                *(f"{self.ns}:v:{version}:ckpt:{i}" for i in range(ckpt_chunks))]

    def _numbers_continue_from(self, version: int) -> None:
        """Redis lost its history, so its counter starts again from 0, but this publisher still
        holds `version`: move the counter up to it first, so the new epoch's numbers go on from
        there and no client sees model_version go back (the epoch tells the histories apart)."""
        key = f"{self.ns}:seq"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if int(pipe.get(key) or 0) >= version:
                        return
                    pipe.multi()
                    pipe.set(key, version)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def _lost_message(self, lease: Lease | None) -> str:
        held = self.lease_holder()
        mine = f"lease {lease.value}" if lease is not None else "no lease"
        return f"publisher holds {mine}, but the current publisher lease is {held or 'none'}"

    def point_to(self, version: int) -> None:
        """Make `version` current and tell subscribers, in one MULTI/EXEC (no lease: for
        operators and tools; a publisher's own `publish` is fenced by its lease)."""
        pipe = self.r.pipeline(transaction=True)
        self._point(pipe, version)
        pipe.execute()

    def rollback(self, version: int, by: str = "operator") -> dict[str, Any]:
        """Serve `version` again (an operator's rollback) and fence out the publisher.

        The version must still be stored and verify, blobs and chain included. In one
        MULTI/EXEC: the fencing token moves on and the lease is dropped (the trainer that held
        it gets `LeaseLost` at its next renewal or publish, so nothing it trained on top of the
        newer versions is published after this), the pointer moves back with its notice, and a
        signed rollback record names the version. The trainer then takes the lease again,
        resumes from the version the pointer names and from the offsets stored with it: the
        events after it are trained again, not lost. Returns the record."""
        target = self.load(version).manifest  # raises VerificationError if it cannot be served
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:  # a publisher taking the lease meanwhile: read the token again
                    pipe.watch(self.lease_seq, self.lease_key)
                    previous = pipe.get(f"{self.ns}:current")
                    token = int(pipe.get(self.lease_seq) or 0) + 1
                    record: dict[str, Any] = {
                        "version": version, "digest": target.digest(), "epoch": target.epoch,
                        "previous": int(previous) if previous is not None else None,
                        "token": token, "by": by, "at": time.time()}
                    record["hmac"] = _sign_record(self.key, record)
                    pipe.multi()
                    pipe.set(self.lease_seq, token)
                    pipe.delete(self.lease_key)
                    self._point(pipe, version)
                    pipe.set(f"{self.ns}:rollback", json.dumps(record))
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return record

    def rollback_record(self) -> dict[str, Any] | None:
        """The newest rollback record, if its signature verifies (else None)."""
        raw = self.r.get(f"{self.ns}:rollback")
        if raw is None:
            return None
        record = json.loads(raw)
        given = record.pop("hmac", "")
        return record if hmac.compare_digest(given, _sign_record(self.key, record)) else None

    def _point(self, pipe: Any, version: int) -> None:
        pipe.zadd(f"{self.ns}:versions", {str(version): version})
        pipe.set(f"{self.ns}:current", version)
        pipe.publish(self.channel, str(version))

    def prune(self) -> None:
        """Keep the newest `keep` versions plus every version their delta chains need. Costs
        the versions it deletes: a chain's links are read once per epoch (`_head`), so a long
        chain (a full snapshot only every few hundred deltas on a large catalog) is not read
        again at every publish (it was 55% of the trainer's time at 100k items)."""
        live = [int(v) for v in self.r.zrange(f"{self.ns}:versions", 0, -1)]
        if len(live) <= self.keep:
            return
        epoch = self.epoch()
        if epoch != self._heads_epoch:
            self._heads, self._heads_epoch = {}, epoch
        needed: set[int] = set()
        for v in reversed(live[-self.keep:]):  # newest first: older chains join known ones
            needed.update(self._chain_versions(v, known=needed))
        for v in live:
            if v not in needed:
                head = self._head(v)
                self.r.delete(*self._keys(v, head[3], head[4]) if head is not None
                              else [f"{self.ns}:v:{v}:manifest"])
                self.r.zrem(f"{self.ns}:versions", str(v))
                self._heads.pop(v, None)

    def _chain_versions(self, version: int, known: set[int] | frozenset[int] = frozenset()
                        ) -> list[int]:
        """The versions `version` needs (itself back to its full snapshot or its newest
        checkpoint, or to a version in `known`), unverified: what retention must keep. Stops at a missing manifest, a
        repeated version or a parent from another epoch, so a looping chain cannot hang it."""
        chain: list[int] = []
        v: int | None = version
        epoch = None
        while v is not None and v not in chain and v not in known:
            head = self._head(v)
            if head is None or (epoch is not None and head[2] != epoch):
                break
            chain.append(v)
            if head[1] == "full" or head[4]:
                break
            v, epoch = head[0], head[2]
        return chain

    def _head(self, version: int) -> tuple[int | None, str, str, int, int] | None:
        """(parent, kind, epoch, chunks, checkpoint chunks) of a stored manifest, unverified, for
        retention only;
        cached: a manifest never changes, and a number is never reused within an epoch (prune
        clears the cache when the epoch changes)."""
        head = self._heads.get(version)
        if head is None:
            m = self._raw_manifest(version)
            if m is None:
                return None
            parent = m.get("parent")
            ckpt = m.get("checkpoint") or {}
            head = (int(parent) if parent is not None else None, str(m.get("kind", "")),
                    str(m.get("epoch", "")), int(m.get("chunks", 0)),
                    int(ckpt.get("chunks", 0)) if isinstance(ckpt, dict) else 0)
            self._heads[version] = head
        return head

    # ------------------------------------------------------------------ reading
    def current(self) -> int | None:
        raw = self.r.get(f"{self.ns}:current")
        return int(raw) if raw is not None else None

    def versions(self) -> list[int]:
        return [int(v) for v in self.r.zrange(f"{self.ns}:versions", 0, -1)]

    def _raw_manifest(self, version: int) -> dict[str, Any] | None:
        raw = self.r.get(f"{self.ns}:v:{version}:manifest")
        return json.loads(raw) if raw is not None else None

    def signature(self, version: int) -> str | None:
        """The stored manifest's HMAC, unverified ("" if unreadable, None if absent): with the
        number it tells two versions apart after a Redis without persistence restarted."""
        raw = self.r.get(f"{self.ns}:v:{version}:manifest")
        if raw is None:
            return None
        try:
            return str(json.loads(raw).get("hmac", ""))
        except (ValueError, AttributeError):
            return ""

    def manifest(self, version: int) -> Manifest:
        """The verified manifest of a version."""
        raw = self._raw_manifest(version)
        if raw is None:
            raise VerificationError("missing", f"version {version} has no manifest")
        try:
            m = Manifest(**raw)
        except TypeError as exc:
            raise VerificationError("bad_manifest", str(exc)) from exc
        m.verify(self.key)
        return m

    def blob(self, manifest: Manifest, checkpoint: bool = False) -> bytes:
        """The version's bytes (its checkpoint's with `checkpoint`), checked against the signed
        sha256."""
        v = manifest.version
        if checkpoint:
            if not manifest.checkpoint:
                raise VerificationError("missing", f"version {v} carries no checkpoint")
            spec = manifest.checkpoint
            chunks, size, sha = int(spec["chunks"]), int(spec["size"]), str(spec["sha256"])
            keys = [f"{self.ns}:v:{v}:ckpt:{i}" for i in range(chunks)]
        else:
            size, sha = manifest.size, manifest.sha256
            keys = [f"{self.ns}:v:{v}:blob:{i}" for i in range(manifest.chunks)]
        parts = []  # a few chunks per MGET: a 1M-item snapshot is 256 MB, one reply's worth of
        for start in range(0, len(keys), 8):  # Redis time past a client's read timeout
            parts += self.r.mget(keys[start: start + 8])
        if any(p is None for p in parts):
            raise VerificationError("missing", f"version {v} lost a blob chunk")
        blob = b"".join(parts)
        if len(blob) != size or hashlib.sha256(blob).hexdigest() != sha:
            raise VerificationError("bad_sha256", f"version {v}: blob hash mismatch")
        return blob

    def load(self, version: int, have: LoadedVersion | None = None) -> LoadedVersion:
        """Materialise `version`, applying deltas from `have` when it is on the chain, else from
        the chain's full snapshot. Every manifest and blob on the way is verified, and each
        parent must be the very version its child names (digest, epoch): a chain that loops or
        splices into another history is refused.

        Without `have` (or when it is not on the chain) loading starts from the newest
        checkpoint on the chain, or its full snapshot (see `_chain`).

        Applying deltas onto `have` costs the rows they changed, never the catalog: the deltas
        are merged (last write wins), then written into the inactive side of `have`'s left-right
        ID-table pool (`model.scorer.ColumnStore`: a buffer no live version reads, brought up to
        date with the rows changed since it was last used). `have`'s own table is never written,
        so a version refused after loading leaves the served one intact. The result's
        `changed_rows` names the rows that differ from `have`."""
        chain, from_have = self._chain(version, have)
        if not chain:
            assert have is not None
            return have
        base = chain[-1]  # the child of `have`, a full snapshot, or a delta with a checkpoint
        try:
            parts = [from_bytes(self.blob(base, checkpoint=not from_have and base.kind == "delta"))]
            parts += [from_bytes(self.blob(m)) for m in reversed(chain[:-1])]
        except WeightsError as exc:
            raise VerificationError("bad_blob", str(exc)) from exc
        return materialise(chain[0], have if from_have else None, parts)

    def _chain(self, version: int, have: LoadedVersion | None
               ) -> tuple[list[Manifest], bool]:
        """Verified manifests from `version` back to where loading starts (newest first), and
        whether it starts from `have` (the parent of the last one) rather than from the last
        one's own whole state (a full snapshot, or a delta's checkpoint); empty when `version`
        is `have` itself. A reader holding an ancestor applies deltas from it (they cost what
        changed); one without, or whose `have` is newer than a checkpoint on the way (so not
        behind it on this chain), starts at the newest checkpoint; a walk past a checkpoint
        that breaks off (pruned, another history) or reaches a full snapshot without meeting
        `have` falls back to that checkpoint."""
        if have is not None and version == have.manifest.version:
            return [], True
        chain = [self.manifest(version)]
        seen = {version}
        at_ckpt = 0  # len(chain) at the newest checkpoint passed, 0: none
        try:
            while chain[-1].kind == "delta":
                child = chain[-1]
                if have is not None and child.parent == have.manifest.version and \
                        parent_matches(child, have.manifest):
                    return chain, True
                if child.checkpoint and not at_ckpt:
                    if have is None or have.manifest.version > child.version:
                        return chain, False
                    at_ckpt = len(chain)
                if child.parent is None:
                    raise VerificationError("broken_chain",
                                            f"version {version} has no full ancestor")
                if child.parent in seen or child.parent >= child.version:
                    raise VerificationError("chain_loop", f"version {child.version} names parent "
                                            f"{child.parent}, which is not older than it")
                parent = self.manifest(child.parent)
                if not parent_matches(child, parent):
                    raise VerificationError("broken_chain", f"version {child.version}: parent "
                                            f"{child.parent} is another version (store lost data?)")
                seen.add(parent.version)
                chain.append(parent)
        except VerificationError:
            if not at_ckpt:
                raise
            return chain[:at_ckpt], False
        return (chain[:at_ckpt], False) if at_ckpt else (chain, False)


def materialise(manifest: Manifest, have: LoadedVersion | None,
                parts: list[tuple[dict[str, torch.Tensor], list[str]]]) -> LoadedVersion:
    """The version `manifest` names from its parsed blobs `parts` (oldest first): deltas on top
    of `have`, or, without `have`, a full snapshot and the deltas after it. Costs the rows the
    deltas change when applied onto `have` (see `WeightStore.load`); raises VerificationError
    ("bad_blob") for parts that do not fit."""
    try:
        if have is not None:
            dense = {k: v for k, v in have.tensors.items() if k != ID_TABLE}
            old = have.tensors[ID_TABLE]
            full_table, base_ids = None, have.item_ids
        else:
            (dense, first_ids), parts = parts[0], parts[1:]
            base_ids = ItemIds(first_ids)
            dense = dict(dense)
            full_table = dense.pop(ID_TABLE, None)
            if full_table is None:
                raise WeightsError("a full snapshot without an ID table")
            old = full_table
        rows, values, size, added = merge_deltas(dense, old.shape[0], len(base_ids), parts)
        if len(rows) and (old.dim() != 2 or values.shape[1:] != old.shape[1:]):
            raise WeightsError("delta rows do not match the ID table's width")
    except WeightsError as exc:
        raise VerificationError("bad_blob", str(exc)) from exc
    ids = (base_ids if isinstance(base_ids, ItemIds) else ItemIds(list(base_ids))
           ).extended(added)
    if full_table is not None:  # a fresh lineage: O(N), as reading the snapshot was
        if size != full_table.shape[0]:
            full_table = torch.cat([full_table, full_table.new_zeros(
                size - full_table.shape[0], full_table.shape[1])])
        if len(rows):  # the snapshot's tensor is fresh from the bytes: nobody reads it
            full_table[rows] = values.to(full_table.dtype)
        store = ColumnStore()
        buf = store.first(full_table)
        changed = None
    else:
        assert have is not None
        store, buf = _lineage(have)
        buf = store.next(buf, old.shape[0], size, rows, values.to(old.dtype))
        changed = rows
    table = buf.data[:size]
    buf.owner = weakref.ref(table)
    return LoadedVersion(manifest, {**dense, ID_TABLE: table}, ids, changed, store)


def _lineage(have: LoadedVersion) -> tuple[ColumnStore, Any]:
    """`have`'s ID-table pool and buffer, when `have` is the newest of its pool; else a new
    pool holding a copy of its table (after a refused version: O(N) once)."""
    store, table = have._store, have.tensors[ID_TABLE]
    if store is not None:
        for buf in store.buffers:
            if buf.gen == store.gen and buf.owner is not None and buf.owner() is table:
                return store, buf
    store = ColumnStore()
    return store, store.first(table)


def merge_deltas(dense: dict[str, torch.Tensor], n: int, n_names: int,
                 deltas: list[tuple[dict[str, torch.Tensor], list[str]]]
                 ) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
    """Fold `deltas` (oldest first; `model.serialization.make_delta`'s form) over a version
    whose dense tensors are `dense` (updated in place) and whose ID table has `n` rows and
    `n_names` names. The ID-table rows come back merged, without touching any table: (rows
    (k,) ascending, values (k, d), new size, appended names). A row written twice keeps the
    newer value; every appended row (from `n` on) is among `rows`. Raises WeightsError for a
    delta that does not fit (shapes, rows out of range, names)."""
    all_rows, all_values = [torch.zeros(0, dtype=torch.long)], []
    size, names = n, n_names
    appended: list[str] = []
    for part, added in deltas:
        for k, v in part.items():
            if not k.startswith("id_emb."):
                if k not in dense or dense[k].shape != v.shape:
                    raise WeightsError(f"delta tensor {k} does not match the base")
                dense[k] = v
        try:
            new_size = int(part["id_emb.size"][0])
            rows, values = part["id_emb.rows"].to(torch.long), part["id_emb.values"]
        except (KeyError, IndexError) as exc:
            raise WeightsError(f"delta lacks its ID rows: {exc}") from exc
        if new_size < size or values.dim() != 2 or len(values) != len(rows):
            raise WeightsError("delta ID rows do not fit the table")
        if rows.numel() and (int(rows.max()) >= new_size or int(rows.min()) < 0):
            raise WeightsError("delta rows out of range")
        if not bool(torch.isin(torch.arange(size, new_size), rows).all()):
            raise WeightsError("delta appends rows it gives no values for")
        appended.extend(added)
        names += len(added)
        if names != new_size:
            raise WeightsError(f"delta names {names} items for a table of {new_size} rows")
        size = new_size
        all_rows.append(rows)
        all_values.append(values)
    if not all_values:
        return all_rows[0], torch.zeros(0, 0), size, appended
    rows = torch.cat(all_rows)
    values = torch.cat(all_values)
    uniq, inverse = rows.unique(return_inverse=True)
    last = torch.full((len(uniq),), -1, dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(len(rows)), "amax")  # the newest write of each row
    return uniq, values[last], size, appended


def _chunks(blob: bytes) -> list[bytes]:
    return [blob[i: i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]


def _sign_record(key: bytes, record: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "hmac"}, sort_keys=True,
                      separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def parent_matches(child: Manifest, parent: Manifest) -> bool:
    """Whether `parent` is the version `child` was made from. Manifests from before digests and
    epochs existed carry neither; for them only the number can be checked."""
    if child.parent_digest is None:
        return child.epoch == "" and parent.version == child.parent
    return parent.digest() == child.parent_digest and parent.epoch == child.epoch


def _manifest_or_none(raw: dict[str, Any] | None) -> Manifest | None:
    try:
        return Manifest(**raw) if raw is not None else None
    except TypeError:
        return None


def _digest_of(raw: dict[str, Any]) -> str | None:
    m = _manifest_or_none(raw)
    return m.digest() if m is not None else None


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw
