"""Full garbage collections do not walk the catalog or the libraries (issue 8).

A generation-2 collection holds the GIL while it walks every container the process has. In
the API at 100k items they took up to 283 ms each, several times a minute under load, and the
requests that came meanwhile waited: the waves of 100-200-ms latencies in `bench.serving`'s
chart. What the API loads at startup, and catalog items read in bulk, are now frozen out of
the collector's reach (`protocol.runtime.freeze_long_lived`)."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import redis
from helpers import client_for, make_items, seed_features, settings, wait_until

from service.holder import FREEZE_ITEMS


def collectable() -> set[int]:
    """Identities of what a full collection walks (frozen objects are not among them)."""
    return {id(o) for o in gc.get_objects()}


def test_startup_and_bulk_catalog_items_are_out_of_the_collectors_reach(
        redis_url: str, namespace: str, tiny_encoder_path: str, tiny_encoder) -> None:  # noqa: ANN001
    r = redis.Redis.from_url(redis_url)
    first = make_items(50)
    fs = seed_features(r, namespace, first, [])
    with client_for(settings(redis_url, namespace, tiny_encoder_path)) as c:
        holder = c.app.state.holder  # type: ignore[attr-defined]
        wait_until(lambda: len(holder.current.catalog) == 50, 10, "the first catalog")
        walked = collectable()
        assert id(holder) not in walked  # loaded at startup
        assert id(holder.current.catalog["i0"]) not in walked

        bulk = make_items(FREEZE_ITEMS, prefix="bulk")
        fs.upsert_items(bulk)
        wait_until(lambda: len(holder.current.catalog) == 50 + FREEZE_ITEMS, 60, "the bulk")
        walked = collectable()
        assert not any(id(holder.current.catalog[item.item_id]) in walked
                       for item in bulk[:: FREEZE_ITEMS // 100])
        assert c.get("/recommend", params={"user_id": "u1"}).status_code == 200


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_background_priority_lowers_only_the_calling_thread() -> None:
    """The ANN index's build, check and recall monitor run nicer than the request threads."""
    from protocol.runtime import BACKGROUND_NICE, background_priority

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def work() -> None:
        seen["lowered"] = background_priority()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"lowered": True, "nice": min(19, main_nice + BACKGROUND_NICE)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_the_served_recall_monitor_runs_nicer_than_requests(
        redis_url: str, namespace: str, tiny_encoder_path: str) -> None:
    r = redis.Redis.from_url(redis_url)
    seed_features(r, namespace, make_items(5), [])
    with client_for(settings(redis_url, namespace, tiny_encoder_path)) as c:
        holder = c.app.state.holder  # type: ignore[attr-defined]
        monitor = holder._monitor
        assert monitor.is_alive()
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        wait_until(lambda: os.getpriority(os.PRIO_PROCESS, monitor.native_id) > base)
        assert os.getpriority(os.PRIO_PROCESS, holder._thread.native_id) == base  # swaps


def test_catalog_items_read_over_several_rounds_are_frozen_too(
        redis_url: str, namespace: str, tiny_encoder_path: str) -> None:
    """A bulk load read while it is being written arrives over several rounds, none of them
    FREEZE_ITEMS long: the items count towards a freeze across rounds (they were never frozen)."""
    r = redis.Redis.from_url(redis_url)
    fs = seed_features(r, namespace, make_items(5), [])
    half = FREEZE_ITEMS // 2 + 1
    with client_for(settings(redis_url, namespace, tiny_encoder_path)) as c:
        holder = c.app.state.holder  # type: ignore[attr-defined]
        wait_until(lambda: len(holder.current.catalog) == 5, 10, "the first catalog")
        parts = [make_items(half, prefix=f"part{k}-") for k in range(2)]
        for k, part in enumerate(parts):
            fs.upsert_items(part)
            wait_until(lambda k=k: len(holder.current.catalog) == 5 + (k + 1) * half, 60,
                       f"part {k}")
        walked = collectable()
        assert not any(id(holder.current.catalog[item.item_id]) in walked
                       for part in parts for item in part[:: half // 50])
