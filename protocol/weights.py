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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import torch

from model.serialization import WeightsError, apply_delta, from_bytes
from protocol.errors import LeaseLost, VerificationError

CHUNK_BYTES = 4 * 1024 * 1024
# Fields added to the manifest later; they are signed only when set, so manifests written before
# them keep verifying (and stripping a set one breaks the HMAC, since it was signed).
LATER_FIELDS = ("parent_digest", "epoch")


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


@dataclass(frozen=True)
class LoadedVersion:
    """A verified, fully materialised version (deltas applied)."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    item_ids: list[str]


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

    def _fenced(self, lease: Lease | None, writes: Callable[[Any], object]) -> bool:
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
            except redis.WatchError:  # the lease changed hands between the check and EXEC
                return False
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
                lease: Lease | None = None) -> Manifest:
        """Store a new immutable version, then move the pointer and notify, atomically.

        `parent` is the manifest the weights were trained from. (A bare number is accepted for
        older callers; then the stored manifest of that number is taken as the parent.) A delta
        whose parent is not the stored version in this epoch raises `StaleParent`; a full
        snapshot whose parent is from another epoch is published without a parent.

        `lease` is the publisher lease; the pointer moves only while it is current (checked in
        the same transaction), else `LeaseLost` and the version's keys are removed again.
        Without a lease, publishing works only while no publisher holds one."""
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
            parent_m = None
        version = int(self.r.incr(f"{self.ns}:seq"))
        chunks = [blob[i: i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
        manifest = Manifest(version, parent_m.version if parent_m else None, kind, config, encoder,
                            hashlib.sha256(blob).hexdigest(), len(blob), len(chunks), time.time(),
                            trained_through, parent_digest=parent_m.digest() if parent_m else None,
                            epoch=epoch).sign(self.key)
        pipe = self.r.pipeline(transaction=False)
        for i, chunk in enumerate(chunks):
            pipe.set(f"{self.ns}:v:{version}:blob:{i}", chunk, nx=True)
        pipe.set(f"{self.ns}:v:{version}:manifest", json.dumps(asdict(manifest)), nx=True)
        if not all(pipe.execute()):
            raise WeightsError(f"version {version} already exists; versions are immutable")
        if not self._fenced(lease, lambda pipe: self._point(pipe, version)):
            self.r.delete(f"{self.ns}:v:{version}:manifest",
                          *(f"{self.ns}:v:{version}:blob:{i}" for i in range(len(chunks))))
            raise LeaseLost(self._lost_message(lease))
        self.prune()
        return manifest

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
        """Keep the newest `keep` versions plus every version their delta chains need."""
        live = [int(v) for v in self.r.zrange(f"{self.ns}:versions", 0, -1)]
        if len(live) <= self.keep:
            return
        needed: set[int] = set()
        for v in live[-self.keep:]:
            needed.update(self._chain_versions(v))
        for v in live:
            if v not in needed:
                m = self._raw_manifest(v)
                keys = [f"{self.ns}:v:{v}:manifest"]
                if m is not None:
                    keys += [f"{self.ns}:v:{v}:blob:{i}" for i in range(int(m.get("chunks", 0)))]
                self.r.delete(*keys)
                self.r.zrem(f"{self.ns}:versions", str(v))

    def _chain_versions(self, version: int) -> list[int]:
        """The versions `version` needs (itself back to its full snapshot), unverified: what
        retention must keep. Stops at a missing manifest, a repeated version or a parent from
        another epoch, so a looping chain cannot hang it."""
        chain: list[int] = []
        v: int | None = version
        epoch = None
        while v is not None and v not in chain:
            m = self._raw_manifest(v)
            if m is None or (epoch is not None and m.get("epoch", "") != epoch):
                break
            chain.append(v)
            if m.get("kind") == "full":
                break
            epoch, v = m.get("epoch", ""), m.get("parent")
        return chain

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

    def blob(self, manifest: Manifest) -> bytes:
        """The version's bytes, checked against the signed sha256."""
        keys = [f"{self.ns}:v:{manifest.version}:blob:{i}" for i in range(manifest.chunks)]
        parts = self.r.mget(keys) if keys else []
        if any(p is None for p in parts):
            raise VerificationError("missing", f"version {manifest.version} lost a blob chunk")
        blob = b"".join(parts)
        if len(blob) != manifest.size or hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise VerificationError("bad_sha256", f"version {manifest.version}: blob hash mismatch")
        return blob

    def load(self, version: int, have: LoadedVersion | None = None) -> LoadedVersion:
        """Materialise `version`, applying deltas from `have` when it is on the chain, else from
        the chain's full snapshot. Every manifest and blob on the way is verified, and each
        parent must be the very version its child names (digest, epoch): a chain that loops or
        splices into another history is refused."""
        chain = self._chain(version, have)
        if not chain:
            assert have is not None
            return have
        base = have if chain[-1].kind == "delta" else None
        tensors, ids = (base.tensors, base.item_ids) if base else ({}, [])
        try:
            for m in reversed(chain):
                part, part_ids = from_bytes(self.blob(m))
                if m.kind == "full":
                    tensors, ids = part, part_ids
                else:
                    tensors, ids = apply_delta(tensors, ids, part, part_ids)
        except WeightsError as exc:
            raise VerificationError("bad_blob", str(exc)) from exc
        return LoadedVersion(chain[0], tensors, ids)

    def _chain(self, version: int, have: LoadedVersion | None) -> list[Manifest]:
        """Verified manifests from `version` back to a full snapshot, or to the child of `have`
        (newest first; empty when `version` is `have` itself)."""
        if have is not None and version == have.manifest.version:
            return []
        chain = [self.manifest(version)]
        seen = {version}
        while chain[-1].kind == "delta":
            child = chain[-1]
            if child.parent is None:
                raise VerificationError("broken_chain", f"version {version} has no full ancestor")
            if child.parent in seen or child.parent >= child.version:
                raise VerificationError("chain_loop", f"version {child.version} names parent "
                                        f"{child.parent}, which is not older than it")
            if have is not None and child.parent == have.manifest.version and \
                    _parent_matches(child, have.manifest):
                break
            parent = self.manifest(child.parent)
            if not _parent_matches(child, parent):
                raise VerificationError("broken_chain", f"version {child.version}: parent "
                                        f"{child.parent} is another version (store lost data?)")
            seen.add(parent.version)
            chain.append(parent)
        return chain


def _sign_record(key: bytes, record: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "hmac"}, sort_keys=True,
                      separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _parent_matches(child: Manifest, parent: Manifest) -> bool:
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
