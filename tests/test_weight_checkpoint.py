"""Checkpoints (issue 8): a version that carries its whole state beside its delta. Before, every
`full_every`-th version was a full snapshot, and every server following the chain loaded it
whole (~220 ms at 100k items: the slowest swap, and the swaps after it waited up to twice that).
Now a server holding the parent reads only the delta; one joining late starts from the newest
checkpoint on the chain, without the versions before it; retention keeps chains back to their
newest checkpoint; a checkpoint whose bytes do not match the signed hash is refused. Real Redis,
synthetic tables."""

from __future__ import annotations

import time
from dataclasses import asdict

import pytest
import redis
import torch

from model.serialization import ID_TABLE, make_delta, to_bytes
from protocol.errors import VerificationError
from protocol.weights import Manifest, WeightStore
from tests.test_weight_delta import CFG, KEY, state, tower


def chain_of(store: WeightStore, n: int, ckpt_at: set[int]) -> tuple[list[Manifest], list]:
    """A full snapshot, then `n` deltas (each moves two rows); the deltas whose position (1..n)
    is in `ckpt_at` carry a checkpoint. Returns the manifests and each version's tables."""
    net, gen = tower(), torch.Generator().manual_seed(0)
    ids = [f"i{j}" for j in range(300)]
    table = torch.randn(300, 64, generator=gen) * 0.3
    states = [state(net, table)]
    published = [store.publish(to_bytes(states[0], ids), parent=None, kind="full",
                               config=asdict(CFG), encoder="synthetic", trained_through={})]
    for k in range(1, n + 1):
        table = table.clone()
        table[torch.tensor([k, 100 + k])] += 0.5
        states.append(state(net, table))
        delta, added = make_delta(states[-2], ids, states[-1], ids)
        published.append(store.publish(
            to_bytes(delta, added), parent=published[-1], kind="delta", config=asdict(CFG),
            encoder="synthetic", trained_through={},
            checkpoint=to_bytes(states[-1], ids) if k in ckpt_at else None))
    return published, [s[ID_TABLE] for s in states]


def test_a_follower_reads_the_delta_and_a_late_joiner_starts_at_the_checkpoint(
        redis_url: str, namespace: str) -> None:
    store = WeightStore(redis.Redis.from_url(redis_url), KEY, namespace, keep=100)
    versions, tables = chain_of(store, 6, ckpt_at={3})
    assert versions[3].kind == "delta" and versions[3].checkpoint is not None
    assert versions[3].checkpoint["size"] > 10 * versions[3].size  # the whole state

    have = store.load(versions[2].version)
    followed = store.load(versions[3].version, have=have)  # the parent is held: the delta
    assert followed.changed_rows is not None and sorted(followed.changed_rows.tolist()) == [3, 103]
    assert torch.equal(followed.tensors[ID_TABLE], tables[3])

    # a late joiner needs nothing older than the checkpoint
    for v in versions[:3]:
        store.r.delete(f"{store.ns}:v:{v.version}:manifest")
    late = store.load(versions[6].version)
    assert late.changed_rows is None and torch.equal(late.tensors[ID_TABLE], tables[6])
    # a server newer than the checkpoint but off this chain's tail starts there too
    again = store.load(versions[6].version, have=followed)
    assert torch.equal(again.tensors[ID_TABLE], tables[6])


def test_a_server_behind_the_checkpoint_applies_deltas_and_falls_back_when_they_are_gone(
        redis_url: str, namespace: str) -> None:
    store = WeightStore(redis.Redis.from_url(redis_url), KEY, namespace, keep=100)
    versions, tables = chain_of(store, 5, ckpt_at={3})
    have = store.load(versions[1].version)
    through = store.load(versions[5].version, have=have)  # deltas 2..5 from what it holds
    assert through.changed_rows is not None
    assert sorted(through.changed_rows.tolist()) == [2, 3, 4, 5, 102, 103, 104, 105]
    assert torch.equal(through.tensors[ID_TABLE], tables[5])
    store.r.delete(f"{store.ns}:v:{versions[2].version}:manifest")  # pruned behind the checkpoint
    fallback = store.load(versions[5].version, have=have)
    assert fallback.changed_rows is None and torch.equal(fallback.tensors[ID_TABLE], tables[5])


def test_retention_keeps_chains_back_to_their_checkpoint_only(redis_url: str,
                                                             namespace: str) -> None:
    store = WeightStore(redis.Redis.from_url(redis_url), KEY, namespace, keep=2)
    versions, tables = chain_of(store, 6, ckpt_at={3})
    kept = set(store.versions())
    assert kept == {v.version for v in versions[3:]}, (kept, [v.version for v in versions])
    assert not store.r.keys(f"{store.ns}:v:{versions[0].version}:*")
    assert torch.equal(store.load(versions[6].version).tensors[ID_TABLE], tables[6])
    store2 = WeightStore(redis.Redis.from_url(redis_url), KEY, namespace, keep=1)
    versions2, _ = chain_of(store2, 2, ckpt_at=set())  # a newer chain, no checkpoint on it
    store2.prune()
    assert not store.r.keys(f"{store.ns}:v:{versions[3].version}:ckpt:*"), \
        "a pruned version's checkpoint was left behind"


def test_a_checkpoint_whose_bytes_do_not_match_is_refused(redis_url: str,
                                                          namespace: str) -> None:
    store = WeightStore(redis.Redis.from_url(redis_url), KEY, namespace, keep=100)
    versions, _ = chain_of(store, 4, ckpt_at={3})
    key = f"{store.ns}:v:{versions[3].version}:ckpt:0"
    raw = bytearray(store.r.get(key))
    raw[-1] ^= 1
    store.r.set(key, bytes(raw))
    with pytest.raises(VerificationError) as err:
        store.load(versions[4].version)
    assert err.value.reason == "bad_sha256"


class _StampedRedis(redis.Redis):
    """A real Redis connection that notes when a pipeline writing a version's bytes finished:
    `stored_at[version]`."""

    stored_at: dict[int, float]

    def pipeline(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        pipe = super().pipeline(*args, **kwargs)
        execute, stamps = pipe.execute, self.stored_at

        def timed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            keys = [str(c[0][1]) for c in pipe.command_stack if len(c[0]) > 1]
            out = execute(*a, **kw)
            for key in keys:
                if ":blob:" in key or ":ckpt:" in key:
                    stamps[int(key.split(":v:")[1].split(":")[0])] = time.time()
            return out

        pipe.execute = timed
        return pipe


def test_created_at_is_when_the_versions_bytes_are_in_redis(redis_url: str, namespace: str
                                                            ) -> None:
    """A server's swap delay runs from `created_at`: stamped before the blob and checkpoint
    were written, it counted the trainer's writes of a large checkpoint as the server's."""
    r = _StampedRedis.from_url(redis_url)
    r.stored_at = {}
    store = WeightStore(r, KEY, namespace, keep=100)
    versions, _ = chain_of(store, 2, ckpt_at={2})
    assert sorted(r.stored_at) == [m.version for m in versions]
    for m in versions:
        assert m.created_at >= r.stored_at[m.version], f"version {m.version} stamped early"
    loaded = store.load(versions[2].version)
    assert loaded.manifest.created_at == versions[2].created_at  # signed as stored
