"""Keeping Python's cyclic garbage collector, and background work, out of the request path.

A full (generation-2) collection walks every container object the process holds, with the GIL
held: in the API at 100k items, 9 of them took up to 283 ms each during a benchmark run, and every
request that arrived meanwhile waited (`bench/RESULTS.md`, "Full garbage collections"). Most of
those objects never die: the modules of torch and transformers (~300k objects, a 133-ms
collection on their own) and the catalog's items. `freeze_long_lived` moves them to the
collector's permanent generation (`gc.freeze`, as Instagram's servers do), so later collections
walk only what was allocated since. Frozen objects are still freed by reference counting; only
a reference cycle among them would outlive its last use, so freeze after loading, not per request.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("freshrec.runtime")
T = TypeVar("T")
# How much nicer than the process background threads run (`background_priority`)
BACKGROUND_NICE = 10


def freeze_long_lived(what: str) -> None:
    """Collect what is garbage now, then freeze everything still alive (`what` is for the log)."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("froze %d long-lived objects after %s (%.0f ms)", gc.get_freeze_count(), what,
             (time.perf_counter() - t0) * 1e3)


def background_priority(nice: int = BACKGROUND_NICE) -> bool:
    """Run the calling thread `nice` steps nicer than the process (Linux; elsewhere a no-op).

    Only for work that holds the GIL for no more than moments (a k-means inside faiss): on a
    busy machine the scheduler then gives the request threads a core first (at nice 10 a thread
    gets ~1/10 of a contended core against nice 0). A niced thread that runs Python code is
    preempted while it holds the GIL and the request threads wait until it runs again (the ANN
    index's check and the recall monitor, niced, stalled requests up to ~230 ms at 100k items:
    bench/RESULTS.md, "Issue 8, session 11"); use `run_nicer` for such a part of a longer job.
    Linux keeps a nice value per thread, so `setpriority` on the thread's own id touches no
    other thread, and an unprivileged thread cannot undo it. Returns whether it was lowered."""
    return lower_priority(threading.get_native_id(), nice)


def lower_priority(tid: int, nice: int) -> bool:
    """Make thread (or process) `tid` `nice` steps nicer, at most 19; whether it could."""
    if not hasattr(os, "setpriority"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        return False  # not ours, or it ended
    return True


def run_nicer(fn: Callable[[], T], nice: int = BACKGROUND_NICE) -> T:
    """`fn()` on a thread of its own, `nice` steps nicer than the process (`background_priority`),
    its result returned or its exception raised here: the caller's own priority stays as it is
    (a thread cannot raise its priority back without privileges)."""
    out: list[T] = []
    err: list[BaseException] = []

    def work() -> None:
        background_priority(nice)
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            err.append(exc)

    worker = threading.Thread(target=work, name=f"{threading.current_thread().name}-nicer")
    worker.start()
    worker.join()
    if err:
        raise err[0]
    return out[0]
