"""The model holder: follows the weight-store pointer and the catalog, verifies, hot-swaps.

A request reads `holder.current` once and is served wholly by that immutable Snapshot, so a swap
is atomic and never fails a request. Loading and verification happen on a background thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import torch

from model.config import ModelConfig
from model.encoder import TextEncoder
from model.events import Item
from model.scorer import Scorer
from model.serialization import ID_TABLE, WeightsError, check_tensors
from model.towers import TwoTower
from protocol.errors import VerificationError
from protocol.features import FeatureStore, share_text_features
from protocol.runtime import freeze_long_lived, run_nicer
from protocol.weights import LoadedVersion, WeightStore
from service import metrics
from service.linear import LinearCatalog

log = logging.getLogger("freshrec.service")
CATALOG_PAGE = 10_000  # catalog items read from Redis per request
CATALOG_ROUND_S = 5.0  # the longest one refresh keeps reading a catalog backlog
FREEZE_ITEMS = 10_000  # catalog items read since the last freeze past which they are frozen (gc)
RECALL_SLACK = 0.02  # served recall this far below the target, over a full window: rebuild
RETRY_MAX_S = 300.0  # a version that failed to build is tried again after 1, 2, 4 ... this many s


@dataclass(frozen=True)
class AnnSettings:
    """When to serve top-k candidates from an ANN index (service/ann.py)."""

    min_items: int = 50_000  # catalog size from which it is used; 0 = never
    nprobe: int = 0  # 0 = tuned when the index is built
    recall: float = 0.97  # what tuning aims for (recall@10 against exact, sampled histories)
    # from this catalog size (and below min_items), exact top-k by faiss's scan
    # (ann.ExactScan); 0 = never. Below it torch's scan takes well under a millisecond.
    scan_min_items: int = 10_000
    min_speedup: float = 1.5  # a tuned index slower than this x the exact scan is not used
    # rebuilt and retuned from the served version this often (and a refused one tried again):
    # the first index is built on the first version served, at a fresh start an untrained
    # model whose vectors cluster unlike a trained one's (bench/ann_head_tail.py, 100k items:
    # nprobe 512 for recall 0.9 after 1,000 events, nprobe 1 for 1.0 after 200,000)
    rebuild_s: float = 300.0
    # served recall@10 measured on queries requests searched with, every this many seconds
    # (ann.RecallMonitor; 0 = never); below `recall` - RECALL_SLACK over a full window, the
    # index is rebuilt
    monitor_s: float = 10.0


@dataclass(frozen=True)
class Snapshot:
    """What one request is served by."""

    version: int  # 0 = no verified version yet
    loaded: LoadedVersion | None
    scorer: Scorer | None
    catalog: dict[str, Item]


class ModelHolder:
    """Owns the current Snapshot and the thread that replaces it."""

    def __init__(self, weights: WeightStore, features: FeatureStore, encoder: TextEncoder,
                 poll_interval_s: float = 0.5, item_dtype: str = "fp32",
                 ann: AnnSettings | None = None) -> None:
        self.weights = weights
        self.item_dtype = item_dtype  # how Scorers store the item matrix (model/quant.py)
        self.ann_settings = ann or AnnSettings()
        self.ann: Any = None  # the AnnIndex following the served lineage, once built
        self._ann_follows: weakref.ref | None = None  # the Scorer the index was last written to
        self._scan: Any = None  # service.ann.ExactScan once made; False: faiss is missing
        self._ann_refused = 0  # catalog size at which the index was measured slower than exact
        self._ann_retry_at = 0.0  # monotonic time from which a refused index is tried again
        self._ann_refusals = 0  # indexes refused in a row (the retry backs off)
        self._ann_started = 0.0  # monotonic time the newest index build started
        self.ann_builds = 0  # index builds finished (attached or refused)
        self.ann_checks = 0  # times the served index was measured still fit, so not rebuilt
        self._ann_misfit = False  # the last check found the served index unfit: build anew
        self._ann_job: _AnnBuild | None = None  # an index being built in the background
        self.recall_monitor: Any = None  # service.ann.RecallMonitor, once an index serves
        self._unfrozen = 0  # catalog items read since the last gc freeze
        self._monitor = threading.Thread(target=self._measure_recall, name="ann-recall",
                                         daemon=True)
        self.features = features
        self.encoder = encoder
        self.poll_interval_s = poll_interval_s
        self.current = Snapshot(0, None, None, {})
        self.swaps = 0
        self.refused: dict[int, str] = {}  # version -> reason; never retried
        self._refused_sig: dict[int, str | None] = {}  # version -> HMAC of the refused manifest
        # version -> (HMAC, failures, monotonic time of the next try) of a build that failed for
        # another reason than verification (a bug, memory): retried, but with a growing pause
        self._failed_builds: dict[int, tuple[str | None, int, float]] = {}
        self.redis_ok = True
        # moving averages of load + verify + build of one version: built row by row from the
        # served one (linear tower), or in full (mlp, startup, a broken lineage)
        self._build_seconds = {"rows": 0.0, "full": 0.0}
        self._next_round_in = poll_interval_s  # shorter while a newer version waits its turn
        self._last_swap = 0.0
        self._catalog: dict[str, Item] = {}
        self._text: dict[str, np.ndarray] = {}
        # item_tower="linear": projections, vocabulary
        self._linear = LinearCatalog(self._text, item_dtype)
        self._catalog_copy: dict[str, Item] | None = None  # what snapshots share until it changes
        self._unshared: set[str] = set()  # items whose features this server encoded itself
        self._cursor = 0
        self._round_since: float | None = None  # monotonic start of the refresh in progress
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-holder", daemon=True)
        self._listener = threading.Thread(target=self._listen, name="model-notices", daemon=True)
        metrics.MODEL_AGE.set_function(self._age)

    def _age(self) -> float:
        loaded = self.current.loaded
        return time.time() - loaded.manifest.created_at if loaded else 0.0

    def problem(self, stuck_after_s: float) -> str | None:
        """Why the loader cannot keep the model current (dead thread, or one refresh running
        for over `stuck_after_s`); None when it is healthy. A round that fails still ends:
        Redis calls time out, so only a genuine hang stays inside one."""
        if self._thread.ident is not None and not self._thread.is_alive() \
                and not self._stop.is_set():
            return "the model loader thread has died"
        since = self._round_since
        if since is not None and (took := time.monotonic() - since) > stuck_after_s:
            return f"the model loader has been inside one refresh for {took:.0f} s"
        return None

    def start(self) -> None:
        self._thread.start()
        if self.ann_settings.min_items and self.ann_settings.monitor_s:
            self._monitor.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)  # a build over a large catalog takes a while
        if self._listener.is_alive():
            self._listener.join(timeout=5)
        if self._monitor.is_alive():
            self._monitor.join(timeout=5)

    # ------------------------------------------------------------------ background loop
    def _run(self) -> None:
        self._listener.start()
        while not self._stop.is_set():
            self._round_since = time.monotonic()
            try:
                self.refresh()
                self.redis_ok = True
            except redis.exceptions.RedisError as exc:
                if self.redis_ok:
                    log.warning("redis unavailable (%s); serving the last good state", exc)
                self.redis_ok = False
            except Exception:  # noqa: BLE001 - the holder must outlive any single bad refresh
                log.exception("refresh failed; serving the last good state")
            self._round_since = None
            pause, self._next_round_in = self._next_round_in, self.poll_interval_s
            self._wake.wait(min(pause, self.poll_interval_s))
            self._wake.clear()

    def _measure_recall(self) -> None:
        """Now and then, the served index's recall@10 on queries requests searched with,
        against the exact scan of the served Scorer (`ann.RecallMonitor`): the figure between
        the index's own checks. An index that falls short over a whole window is rebuilt.
        At the request threads' priority: it runs Python code between its scans (see
        `background_priority`)."""
        while not self._stop.wait(self.ann_settings.monitor_s):
            try:
                self._recall_round()
            except Exception:  # noqa: BLE001 - a measurement must never stop serving
                log.exception("measuring the served recall failed")

    def _recall_round(self) -> None:
        monitor, scorer = self.recall_monitor, self.current.scorer
        index = getattr(scorer, "ann", None)
        if monitor is None or index is None or index is not self.ann:
            return  # exact serving, or an index not yet attached
        if monitor.measure(scorer, index) is None:
            return  # no request searched the index since the last round
        window = monitor.window
        metrics.ANN_SERVED_RECALL.set(window)
        if monitor.window_full and window < self.ann_settings.recall - RECALL_SLACK \
                and self._ann_job is None:
            log.warning("the ANN index served recall@10 %.3f over the last %s queries "
                        "(target %.2f); checking it now", window, monitor.window_queries,
                        self.ann_settings.recall)
            self._ann_started = float("-inf")  # the next version starts a check: more lists
            monitor.reset()  # searched, or a new index if that is not enough; this one serves on

    def _listen(self) -> None:
        """Pub/sub notices wake the loop at once; the poll covers what pub/sub drops."""
        while not self._stop.is_set():
            try:
                pubsub = self.weights.r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.weights.channel)
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._wake.set()
            except redis.exceptions.RedisError:
                time.sleep(1.0)

    def _signature(self, version: int) -> str | None:
        """With the number, the stored manifest's HMAC identifies a version: a Redis that lost
        its data (no persistence) hands the numbers out again."""
        return self.weights.signature(version)

    def refresh(self) -> None:
        """One round: new catalog items, then a newer version if there is one."""
        catalog_changed = self._pull_catalog()
        target = self.weights.current()
        read_at = time.monotonic()  # the pointer read: the delay before it was not this round's
        cur = self.current
        served = cur.loaded.manifest.hmac if cur.loaded is not None else None
        sig = self._signature(target) if target is not None else None
        new = target is not None and not (target == cur.version and sig in (None, served))
        if new and target in self.refused and self._refused_sig.get(target) == sig:
            new = False  # refused once, never retried (unless the number now names another one)
        failed = self._failed_builds.get(target) if target is not None else None
        if new and failed is not None and failed[0] == sig and time.monotonic() < failed[2]:
            new = False  # failed to build a moment ago: wait out its backoff
        # the next build most likely costs what the last ones of its kind did: a full one (at
        # startup, 9 s at 100k items) must not hold back the cheap row builds after it
        expect = self._build_seconds["rows" if cur.scorer is not None and cur.scorer.linear
                                     else "full"]
        wait = self._last_swap + 2 * expect - time.monotonic()
        if new and cur.loaded is not None and wait > 0:
            # a build costs CPU that requests need: at most half of one core on it; the loop
            # comes back when the pause ends, not a whole poll interval later
            new, self._next_round_in = False, wait
        if new:
            assert target is not None
            if target == cur.version:
                log.warning("version %s was replaced in Redis (did the store lose its data?); "
                            "loading the new one", target)
            # A delta may be applied onto what we serve only if that is still the stored version.
            have = (cur.loaded if cur.loaded is not None and target != cur.version
                    and self._signature(cur.version) == served else None)
            t0 = time.monotonic()
            try:
                loaded = self.weights.load(target, have=have)
                rows = self._changed_rows(loaded, have)
                t1 = time.monotonic()
                built = self._build(loaded, rows)
                t2 = time.monotonic()
                scorer = self._with_ann(built)
            except (VerificationError, ValueError) as exc:  # WeightsError is a ValueError
                reason = getattr(exc, "reason", None) or (
                    "bad_shape" if isinstance(exc, WeightsError) else "bad_manifest")
                self.refused[target] = reason
                self._refused_sig[target] = sig
                metrics.SWAP_FAILURES.labels(reason).inc()
                log.error("refused version %s (%s); still serving %s", target, exc, cur.version)
                return
            except redis.exceptions.RedisError:
                raise  # Redis is down, the version may be fine: the loop's own retry
            except Exception as exc:  # noqa: BLE001 - a bug or resource error building it
                self._build_failed(target, sig, exc, cur.version)
                return
            self.refused.pop(target, None)
            self._failed_builds.pop(target, None)
            kind = "full" if rows is None else "rows"
            self._build_seconds[kind] = 0.7 * self._build_seconds[kind] + \
                0.3 * (time.monotonic() - t0)
            self._last_swap = time.monotonic()
            self._swap(Snapshot(target, loaded, scorer, self._catalog_view()), scorer.changed,
                       check_s=t0 - read_at, load_s=t1 - t0, build_s=t2 - t1, index_s=self._last_swap - t2)
        elif catalog_changed and cur.loaded is not None:
            unchanged = torch.zeros(0, dtype=torch.long)  # same weights: only the catalog moved
            self.current = Snapshot(cur.version, cur.loaded,
                                    self._with_ann(self._build(cur.loaded, unchanged)),
                                    self._catalog_view())
        elif catalog_changed:
            self.current = Snapshot(0, None, None, self._catalog_view())
        else:
            self._adopt_ann()

    def _catalog_view(self) -> dict[str, Item]:
        """The catalog for a snapshot: copied only when it changed since the last one."""
        if self._catalog_copy is None:
            self._catalog_copy = dict(self._catalog)
        return self._catalog_copy

    def _changed_rows(self, loaded: LoadedVersion, have: LoadedVersion | None
                      ) -> torch.Tensor | None:
        """(k,) the ID-table rows (appended ones included) in which a linear-tower `loaded`
        differs from the served `have`; None when it is not comparable (build in full)."""
        if have is None or loaded is have or loaded.manifest.config != have.manifest.config \
                or loaded.manifest.config.get("item_tower") != "linear":
            return None
        rows = loaded.changed_rows  # the store reports what its deltas changed
        return rows if rows is not None else _table_diff(loaded, have)

    def _with_ann(self, scorer: Scorer) -> Scorer:
        """Attach the ANN index to a linear Scorer over a large enough catalog: its changed
        rows written in place when it was built from the Scorer the index follows. An index
        for a new lineage (startup, a full rebuild) is built and tuned on a thread of its own
        (minutes at 1M items) while exact top-k serves and new versions keep being swapped in;
        the rows they changed meanwhile are written into it before it is attached. Exact
        serving when faiss is missing."""
        want = self.ann_settings
        if not want.min_items or not scorer.linear or len(scorer) < want.min_items:
            return self._with_scan(scorer)
        from service import ann

        if not ann.available():
            if self.ann is None:
                log.warning("FRESHREC_ANN_MIN_ITEMS is set but faiss is not installed "
                            "(pip install freshrec[ann]); serving exact top-k")
                self.ann = False
            return scorer
        self._adopt_ann()
        now = time.monotonic()
        if self._ann_refused and len(scorer) < 2 * self._ann_refused and now < self._ann_retry_at:
            return self._with_scan(scorer)  # measured slower than exact lately, at this size
        follows = bool(self.ann) and scorer.changed is not None and \
            self._ann_follows is not None and self._ann_follows() is self.current.scorer
        job = self._ann_job
        if follows:
            if job is None or not job.check:  # a check measures the index as it was when it
                self.ann.update(scorer, scorer.changed)  # began: rows come in after it (backlog)
            self._ann_follows = weakref.ref(scorer)
            scorer.ann = self.ann
        if job is None:
            if not follows:  # no index for this lineage: exact until one is built
                self.ann, self._ann_follows = None, None
            due = now - self._ann_started >= want.rebuild_s
            if due and follows and not self._ann_misfit and self._served_fits():
                self.ann_checks += 1  # the monitor measured it on served queries: no check
                self._ann_started = now  # (100 exact top-10s: 4 s of a core at 1M items)
            elif not follows or self._ann_misfit or due:
                check = follows and not self._ann_misfit
                self._ann_job = _AnnBuild(scorer, want, self.ann if check else None,
                                          self._tuning_queries(scorer, 200 if not check else 100))
                self._ann_started = now
        elif job.valid and scorer.changed is not None and job.last() is self.current.scorer:
            job.backlog.append(scorer.changed)  # written into the index once it is built
            job.last = weakref.ref(scorer)
        else:
            job.valid = False  # another lineage: discarded when done, then built again
        return scorer if follows else self._with_scan(scorer)

    def _adopt_ann(self) -> None:
        """Attach an index built in the background to the served Scorer, once the rows changed
        since the Scorer it was built from are written into it (a few thousand rows: well
        under a second)."""
        job = self._ann_job
        if job is None or job.thread.is_alive():
            return
        self._ann_job = None
        cur = self.current.scorer
        if job.check:
            if self.ann and job.valid and cur is not None and job.last() is cur and job.backlog:
                self.ann.update(cur, torch.cat(job.backlog).unique())  # the check's backlog
            if job.kept:  # still fits the model: the next check in rebuild_s
                self.ann_checks += 1
            else:  # the served index goes on serving (and following) while its successor builds
                self._ann_misfit = True
            return
        self._ann_misfit = False
        self.ann_builds += 1
        if job.refused_at:  # exact from now on; tried again soon, or at twice the size
            # At a fresh start the first index is built on an untrained model, whose vectors
            # do not cluster yet (1M items: nprobe 720 of 4,000 for its recall, 1.3x the exact
            # scan, refused), and minutes of learning later they do. Exact top-k over 1M items
            # holds ~40 req/s here, so the next try comes after twice the build's time (a
            # third of a core at most), doubling with each refusal up to rebuild_s: a
            # catalog that never clusters soon costs no more than it did.
            self._ann_refusals += 1
            self._ann_refused = job.refused_at
            self._ann_retry_at = time.monotonic() + min(
                job.rebuild_s, job.took_s * 2 ** self._ann_refusals)
            if self.ann and cur is not None and cur.ann is self.ann:
                cur.ann = None
                self._with_scan(cur)
            self.ann, self._ann_follows = None, None
            return
        if job.index is None or not job.valid or cur is None or job.last() is not cur:
            return  # failed (logged), or a full rebuild came between: the next build starts one
        rows = torch.cat(job.backlog).unique() if job.backlog else torch.zeros(0, dtype=torch.long)
        job.index.update(cur, rows)
        if self.ann_settings.monitor_s:
            from service.ann import RecallMonitor

            if self.recall_monitor is None:
                self.recall_monitor = RecallMonitor(self.ann_settings.monitor_s)
            self.recall_monitor.reset()  # the window measures this index
            job.index.on_query = self.recall_monitor.offer
        self.ann, self._ann_follows, self._ann_refused = job.index, weakref.ref(cur), 0
        self._ann_refusals = 0
        cur.ann = job.index  # requests that read the Scorer from now on use the index
        log.info("ANN index attached to version %s (%s rows written since its build)",
                 self.current.version, len(rows))

    def _with_scan(self, scorer: Scorer) -> Scorer:
        """Exact candidates from faiss's scan for a linear tower's fp32 columns when faiss is
        installed and measured faster than torch's on this CPU (once, at the first catalog
        this large: `service.ann.scan_speedup`): the same top-k and scores as torch's scan.
        Which wins depends on the CPU (2.2-5.5x faiss on one machine, 2x torch on another).
        Not for `mlp`: its matrix products round differently on a subset of rows, so its
        served scores would no longer equal the learner's bit for bit; nor below
        `scan_min_items`, where MKL takes other kernels for a handful of rows too."""
        least = self.ann_settings.scan_min_items
        if not least or len(scorer) < least or scorer.dtype != "fp32" or not scorer.linear:
            return scorer
        if self._scan is None:
            from service import ann

            self._scan = False
            if ann.available():
                users = torch.randn(48, scorer.net.cfg.dim, generator=torch.Generator()
                                    .manual_seed(0))
                speedup = ann.scan_speedup(scorer, users)
                log.info("exact scan over %s items: faiss %.2fx torch's speed; serving %s",
                         len(scorer), speedup, "faiss's" if speedup > 1 else "torch's")
                if speedup > 1:
                    self._scan = ann.ExactScan()
        if self._scan:
            scorer.ann = self._scan
        return scorer

    def retrieval(self) -> dict[str, Any]:
        """What serves top-k now: `exact` (torch's scan, or faiss's: `scan`) or `ann` (IVF,
        with the recall@10 it was tuned to), and how the item matrix is stored."""
        scorer = self.current.scorer
        found = getattr(scorer, "ann", None)
        if found is None:
            kind, scan = "exact", "torch"
        elif found is self._scan:
            kind, scan = "exact", "faiss"
        else:
            kind, scan = "ann", "faiss-ivf"
        return {"retrieval": kind, "scan": scan, "dtype": self.item_dtype,
                "ann_building": self._ann_job is not None, "ann_builds": self.ann_builds,
                "ann_checks": self.ann_checks,
                "recall@10": 1.0 if kind == "exact" else getattr(found, "recall", None),
                **self._served_recall(kind),
                "nprobe": getattr(found, "nprobe", None),
                "speedup": getattr(found, "speedup", None)}

    def _served_fits(self) -> bool:
        """Whether the recall monitor's full window, on the index serving now, reaches the
        target: then that is the periodic check (it measured served queries, the check would
        measure fewer of them at one moment)."""
        monitor = self.recall_monitor
        return (monitor is not None and monitor.window_full
                and (monitor.window or 0.0) >= self.ann_settings.recall)

    def _tuning_queries(self, scorer: Scorer, n: int) -> torch.Tensor:
        """(m, d) queries to tune or check an index on: the last `n` that requests searched
        with (the recall monitor's pool), else, before enough traffic, `n` users of random
        3-item histories."""
        pooled = self.recall_monitor.pool(n) if self.recall_monitor is not None else None
        return pooled if pooled is not None else _sampled_users(scorer, n)

    def _served_recall(self, kind: str) -> dict[str, Any]:
        """What the recall monitor measured (None before any measurement)."""
        monitor = self.recall_monitor
        if monitor is None:
            return {"served_recall@10": 1.0 if kind == "exact" else None}
        # the window, and the counts since this server started (a client takes differences)
        return {"served_recall@10": monitor.window, "served_recall_hits": monitor.hits,
                "served_recall_asked": monitor.asked}

    def _build_failed(self, target: int, sig: str | None, exc: Exception, serving: int) -> None:
        """Count a failed build and set when to try it again (1, 2, 4 ... RETRY_MAX_S s), so a
        version that cannot be built does not cost a full load and build at every poll."""
        old = self._failed_builds.get(target)
        failures = old[1] + 1 if old is not None and old[0] == sig else 1
        pause = min(RETRY_MAX_S, 2.0 ** (failures - 1))
        self._failed_builds = {target: (sig, failures, time.monotonic() + pause)}  # only the newest
        metrics.SWAP_FAILURES.labels("build_error").inc()
        log.error("version %s failed to build (%s: %s); still serving %s, next try in %.0f s",
                  target, type(exc).__name__, exc, serving, pause)

    def _swap(self, snap: Snapshot, rows: torch.Tensor | None = None, **took: float) -> None:
        """Serve `snap`; `took` times the parts of the round that built it (seconds), logged
        with the version's delay: where the time from the store to serving went, and how many
        item rows it wrote (`rows`, None: built in full), which the build and index parts of
        a linear tower cost in proportion to."""
        self.current = snap  # one reference assignment: atomic for every reader
        self.swaps += 1
        metrics.SWAPS.inc()
        metrics.VERSION.set(snap.version)
        now = time.time()
        assert snap.loaded is not None
        delay = max(0.0, now - snap.loaded.manifest.created_at)
        metrics.SWAP_DELAY.observe(delay)
        for ts in snap.loaded.manifest.trained_through.get("produced_ts", []):
            metrics.FRESHNESS.observe(max(0.0, now - float(ts)))
        if took:  # before the loader read the pointer: the notice, the loader busy or pausing
            took = {"before_s": max(0.0, delay - sum(took.values())), **took}
        parts = ", ".join(f"{name[:-2]} {1e3 * s:.1f}" for name, s in took.items())
        log.info("serving version %s, %.1f ms after it was stored (%s ms; %s)", snap.version,
                 1e3 * delay, parts or "-", "full build" if rows is None else f"{len(rows)} rows")

    def _pull_catalog(self) -> bool:
        changed = self._adopt_shared_features()
        # A backlog (startup, a bulk load) is read page after page for up to CATALOG_ROUND_S,
        # then built once, not once per 10,000-item page (the API took 12.6 minutes to come up
        # on a 1M-item catalog; a 200k one, no version yet, was pulled in 19.0 s, now 11.5 s).
        items: list[Item] = []
        t0 = time.monotonic()
        while True:
            before = self._cursor
            page, self._cursor = self.features.items_since(self._cursor, CATALOG_PAGE)
            items += page
            if self._cursor - before < CATALOG_PAGE or time.monotonic() - t0 > CATALOG_ROUND_S:
                break
        if not items and self._cursor and self.features.items_log_length() < self._cursor:
            # The log is shorter than what we read: the store lost its data. Read it again,
            # or items defined from now on stay invisible until the log regrows past the cursor.
            log.warning("the catalog log shrank (did the store lose its data?); re-reading it")
            items, self._cursor = self.features.items_since(0)
        if not items:
            return changed
        feats, unshared = share_text_features(self.features, self.encoder, items)
        for item in items:
            self._catalog[item.item_id] = item
            self._text[item.item_id] = feats[item.item_id]
            self._unshared.discard(item.item_id)
        self._unshared |= unshared
        self._catalog_copy = None
        self._linear.items_changed(item.item_id for item in items)
        # counted across rounds: a bulk load read while it was being written arrives in parts
        self._unfrozen += len(items)
        if self._unfrozen >= FREEZE_ITEMS:
            freeze_long_lived(f"{self._unfrozen:,} catalog items")
            self._unfrozen = 0
        return True

    def _adopt_shared_features(self) -> bool:
        """Replace the features this server encoded itself (a read-only user cannot memoise
        them) by the memo's once the trainer stored its own: it learned with those, and the
        encoder's last bits depend on the batch an item was encoded in."""
        if not self._unshared:
            return False
        ids = list(itertools.islice(self._unshared, 10_000))  # bounded work per round
        stored = self.features.text_features(self.encoder.identity, ids)
        changed = False
        for item_id, vec in stored.items():
            if vec.shape == (self.encoder.dim,):
                self._unshared.discard(item_id)
                if not np.array_equal(vec, self._text[item_id]):
                    changed = True
                    self._linear.items_changed([item_id])
                self._text[item_id] = vec
        return changed

    def _build(self, loaded: LoadedVersion, rows: torch.Tensor | None = None) -> Scorer:
        """Verify shapes and finiteness against the manifest's architecture, then build.

        A linear item tower is built from the served Scorer when `rows` (k,) names the ID rows
        that changed since the version it serves (only those rows are checked: the rest were
        checked then), else in full from the cached per-item projections. `mlp` builds in full."""
        m = loaded.manifest
        if m.encoder != self.encoder.identity:
            raise VerificationError("encoder_mismatch",
                                    f"version {m.version} needs encoder {m.encoder}, "
                                    f"this server has {self.encoder.identity}")
        cfg = ModelConfig.from_dict(m.config)
        if cfg.policy != "head":
            raise VerificationError("unsupported_policy",
                                    f"serving supports the head policy, got {cfg.policy}")
        linear = cfg.item_tower == "linear"
        rows = rows if linear else None
        net = TwoTower(cfg, self.encoder.dim, 0 if linear else len(loaded.item_ids))
        expected = {k: v.shape for k, v in net.state_dict().items()}
        for name, t in loaded.tensors.items():  # its own reason: NaN is not a shape problem
            if name == ID_TABLE and rows is not None and t.dim() == 2:
                t = t[rows[rows < len(t)]]  # the rest was checked in the version served
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise VerificationError("non_finite",
                                        f"version {m.version}: tensor {name} has non-finite values")
        check_tensors(loaded.tensors, expected, len(loaded.item_ids), rows)
        table = loaded.tensors[ID_TABLE]
        if linear:  # the Scorer reads the dense towers only: the ID table is not copied
            net.load_state_dict({k: v for k, v in loaded.tensors.items() if k != ID_TABLE},
                                strict=False)
            net.eval()
            prev = self.current.scorer
            if rows is not None and prev is not None and prev.linear:
                scorer = self._linear.updated(prev, net, loaded.item_ids, table, rows)
                if scorer is not None:
                    metrics.BUILDS.labels("rows").inc()
                    return scorer
            metrics.BUILDS.labels("full").inc()
            return self._linear.full(net, loaded.item_ids, table, self._catalog)
        net.load_state_dict(loaded.tensors)
        net.eval()
        # unused by `mlp`: keep nothing growing in it
        self._linear = LinearCatalog(self._text, self.item_dtype)
        known = set(loaded.item_ids)
        ids = list(loaded.item_ids) + [i for i in self._catalog if i not in known]
        zero = np.zeros(self.encoder.dim, dtype=np.float32)
        text = torch.from_numpy(np.stack([self._text.get(i, zero) for i in ids])
                                if ids else np.zeros((0, self.encoder.dim), np.float32))
        assert table.shape[0] == len(loaded.item_ids)
        metrics.BUILDS.labels("full").inc()
        return Scorer(net, text, ids, dtype=self.item_dtype)


def _table_diff(loaded: LoadedVersion, have: LoadedVersion) -> torch.Tensor | None:
    """The rows in which a full snapshot (every `full_every`-th version) differs from the served
    version whose item order it extends: one comparison of the two ID tables, O(N d) reads but
    no rebuild. A non-finite row never compares equal, so it is among the rows checked."""
    old, new = have.tensors[ID_TABLE], loaded.tensors[ID_TABLE]
    n = len(have.item_ids)
    if new.shape[0] < n or new.shape[1:] != old.shape[1:] or loaded.item_ids[:n] != have.item_ids:
        return None
    changed = (new[:n] != old).any(dim=1).nonzero().flatten()  # (k,)
    return torch.cat([changed, torch.arange(n, new.shape[0])])


def _sampled_users(scorer: Scorer, n: int, seed: int = 0) -> torch.Tensor:
    """(n, d) user vectors of histories of 3 items drawn at random from the catalog."""
    picks = np.random.default_rng(seed).integers(0, len(scorer), size=(n, 3)).tolist()
    return scorer.user_vectors([[scorer.names.name(j) for j in p] for p in picks])


class _AnnBuild:
    """An ANN index being built and tuned from `scorer` on a thread of its own, and the rows
    changed by the versions served meanwhile (`backlog`), which must be written into it before
    it serves. `valid` turns False when a version is not built from the one before it.

    `queries` (B, d) are the user vectors it is tuned (or checked) on: recent requests' when
    there were enough (`ModelHolder._tuning_queries`).

    With `served`, the index serving now, it is a `check` instead: the thread measures that
    index on `queries` with `scorer` (`AnnIndex.refit`) and builds nothing; it is `kept`
    if it still prunes well at the target recall, else the holder builds a new one next. A
    k-means over 1M items took a core for 50-190 s (`bench.serving`), so rebuilding every
    `rebuild_s` regardless kept one of the two cores busy much of the time."""

    def __init__(self, scorer: Scorer, want: AnnSettings, served: Any = None,
                 queries: torch.Tensor | None = None) -> None:
        self.index: Any = None
        self.check = served is not None  # measure `served`, build nothing
        self.kept = False
        self.refused_at = 0  # the catalog size at which the index was slower than exact
        self.took_s = 0.0  # how long the build and its tuning took
        self.valid = True
        self.rebuild_s = want.rebuild_s
        self.backlog: list[torch.Tensor] = []
        self.last = weakref.ref(scorer)  # the newest Scorer whose changed rows are in backlog
        self.thread = threading.Thread(target=self._check if self.check else self._build,
                                       args=(scorer, want, served, queries),
                                       name="ann-build", daemon=True)
        self.thread.start()

    def _check(self, scorer: Scorer, want: AnnSettings, served: Any,
               queries: torch.Tensor | None) -> None:
        """Measure the served index on `queries` with `scorer`, the version its rows were last
        written from; the versions swapped in meanwhile wait in `backlog`, so the index does
        not change under the measurement (its searches take no lock). At the request
        threads' priority, as the recall monitor."""
        from service import ann

        try:
            t0 = time.monotonic()
            if queries is None:
                queries = _sampled_users(scorer, 100, seed=1)
            recall = served.refit(scorer, queries, want.recall)
            self.kept = recall is not None
            if self.kept:
                log.info("ANN index kept: recall@10 %.3f at nprobe %s of %s on %s queries "
                         "(checked in %.1f s)", recall, served.index.nprobe,
                         served.nlist, len(queries), time.monotonic() - t0)
            else:
                log.info("the ANN index no longer reaches recall@10 %.2f within 1/%s of its "
                         "lists (nprobe, recall: %s); rebuilding it", want.recall, ann.FIT_LISTS,
                         ", ".join(f"{p} {r:.3f}" for p, r in getattr(served, "checked", [])))
        except Exception:  # noqa: BLE001 - it goes on serving; the next check in rebuild_s
            log.exception("checking the ANN index failed")
            self.kept = True

    def _build(self, scorer: Scorer, want: AnnSettings, served: Any,
               queries: torch.Tensor | None) -> None:
        from service import ann

        try:
            import faiss

            t0 = time.monotonic()
            index = ann.AnnIndex(nprobe=want.nprobe, target_recall=want.recall)

            def kmeans() -> None:  # minutes at 1M items, inside faiss with the GIL released:
                faiss.omp_set_num_threads(1)  # nicer than requests, on one core
                index.build(scorer)

            run_nicer(kmeans)  # the tuning after it runs Python code: at this thread's priority
            if queries is None:
                queries = _sampled_users(scorer, 200, seed=0)
            if not want.nprobe:
                index.tune(scorer, queries)
            self.took_s = time.monotonic() - t0
            log.info("ANN index over %s items built in %.1f s (nlist %s, nprobe %s, recall@10 "
                     "%.3f on %s queries, %.1fx the exact scan's speed)", len(scorer),
                     self.took_s, index.nlist, index.nprobe,
                     index.recall or float("nan"), len(queries), index.speedup or float("nan"))
            if index.speedup is not None and index.speedup < want.min_speedup:
                # the catalog's vectors do not cluster enough for this recall (i.i.d. random
                # text, or an untrained model): serve exact, try again later (`_adopt_ann`)
                log.warning("the ANN index is not faster than the exact scan at recall %.3f; "
                            "serving exact top-k", index.recall or float("nan"))
                self.refused_at = len(scorer)
            else:
                self.index = index
        except Exception:  # noqa: BLE001 - exact serving goes on; the next build tries again
            log.exception("building the ANN index failed; serving exact top-k")
