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
import time

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
    """`run_nicer` runs its function nicer than the process on a thread of its own (the ANN
    index's k-means), hands back its result or exception, and leaves the caller as it was."""
    from protocol.runtime import BACKGROUND_NICE, run_nicer

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = run_nicer(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert seen == min(19, main_nice + BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice
    with pytest.raises(KeyError, match="boom"):
        run_nicer(lambda: {}["boom"])


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_the_benchmark_lowers_every_thread_of_a_process() -> None:
    """`bench.serving --nice` lowers each thread of another process (Linux keeps a nice value
    per thread: lowering the process id alone leaves its other threads as they were)."""
    import subprocess
    import sys
    from pathlib import Path

    from bench.serving import nicer

    child = subprocess.Popen([sys.executable, "-c", "import threading, time\n"
                              "threading.Thread(target=time.sleep, args=(30,)).start()\n"
                              "print('up', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        tids = [int(t.name) for t in Path(f"/proc/{child.pid}/task").iterdir()]
        before = {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids}
        nicer(child.pid, 3)
        assert len(tids) >= 2
        assert {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids} == \
            {tid: min(19, nice + 3) for tid, nice in before.items()}
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_threads_that_run_python_code_run_at_the_request_threads_priority(
        redis_url: str, namespace: str, tiny_encoder_path: str) -> None:
    """A niced thread that holds the GIL is preempted holding it, and the request threads wait
    until it runs again: the ANN index's check and the served-recall monitor, niced, stalled
    /recommend up to ~230 ms at 100k items (bench/RESULTS.md, "Issue 8, session 11"). They
    run at the request threads' priority; only the k-means inside faiss runs nicer."""
    import torch

    from service.holder import AnnSettings, _AnnBuild

    r = redis.Redis.from_url(redis_url)
    seed_features(r, namespace, make_items(5), [])
    with client_for(settings(redis_url, namespace, tiny_encoder_path)) as c:
        holder = c.app.state.holder  # type: ignore[attr-defined]
        monitor = holder._monitor
        assert monitor.is_alive()
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        time.sleep(0.2)  # it used to lower its priority first thing
        assert os.getpriority(os.PRIO_PROCESS, monitor.native_id) == base
        assert os.getpriority(os.PRIO_PROCESS, holder._thread.native_id) == base  # swaps

    class Served:  # what a check measures: records the priority it is measured at
        seen: list[int] = []

        def refit(self, scorer, queries, target):  # noqa: ANN001, ANN202
            self.seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    class Scorer:  # the version the index was last written from: not read by `Served`
        pass

    check = _AnnBuild(Scorer(), AnnSettings(), Served(), torch.zeros(1, 4))  # type: ignore[arg-type]
    check.thread.join(10)
    assert Served.seen == [base]


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
