"""Approximate top-k candidates for large catalogs: a faiss IVF index updated row by row.

The index only proposes candidates. A request asks it for more than it needs (k, plus the items
it must exclude, plus `overfetch`), then scores those candidates exactly with the columns of its
own Scorer (so every score it returns comes from one version, as in an exact request), drops
excluded items exactly, and falls back to the exact scan when fewer than k survive. What the
approximation can cost is recall (a true top-k item never proposed), measured against exact
top-k in bench/ann.py and by `AnnIndex.tune` when the index is built.

The index follows the served Scorer lineage: built once from a full Scorer (k-means on a sample,
then every row assigned), then each new version's changed and appended rows are written in
place (`update_vectors` for changed rows, `add` for appended ones; positions are the Scorer's
row positions, append-only). faiss is not safe for a search during an update, so both take a
lock; an update of a few hundred rows holds it for about a millisecond, and a search while a
version is being written may propose candidates from either version (scores stay exact).

faiss-cpu is an optional dependency (`pip install freshrec[ann]`); without it, or below
`min_items`, serving is exact.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from model import quant
from model.scorer import Scorer

log = logging.getLogger("freshrec.service")
BUSY_BATCH = 8  # queries per scan when the server is busy (the batcher's mean at 200 req/s: 7.4)


def available() -> bool:
    """Whether faiss can be imported here."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class AnnIndex:
    """An IVF-Flat inner-product index over a Scorer's candidate columns, with row updates."""

    def __init__(self, nlist: int = 0, nprobe: int = 0, overfetch: int = 50,
                 target_recall: float = 0.97, seed: int = 0, equal_norms: bool = True) -> None:
        import faiss

        self._faiss = faiss
        self.nlist, self.nprobe, self.overfetch = nlist, nprobe, overfetch
        self.target_recall, self.seed = target_recall, seed
        self.index: Any = None
        self.size = 0  # rows indexed (positions 0 .. size-1)
        self.recall: float | None = None  # recall@10 measured by `tune`
        self.lock = threading.Lock()
        self.fallbacks = 0  # requests answered by the exact scan after all
        self.speedup: float | None = None  # exact scan time / this index's, measured by `tune`
        self.tuned_nprobe = 0  # what `tune` chose: a check searches at least that many lists
        self.on_query: Any = None  # called with each search's (B, d) users (RecallMonitor.offer)
        # `equal_norms`: each row is stored with one more column that brings it to norm M, each
        # query with a zero there, so every inner product is unchanged. The lists' centroids
        # (spherical k-means) then share that column, so probing ranks a list by about its rows'
        # mean inner product with the query instead of by direction alone. Measured
        # (bench/ann_norms.py, user-like queries, the model learning): with plain lists the
        # recall at the tuned nprobe fell to 0.1-0.9 within 20,000-80,000 events at 100k items;
        # with this it stayed 1.000 at nprobe 1-2. (The transform is the classic one for
        # inner-product search over rows of unequal norms, Bachrach et al. 2014; the linear
        # tower's columns are nearly equal, at most sqrt(2), so here what it changes is the
        # probing.) M is 1.2x the longest row at build; a row updated past it is stored at its
        # own length and counted in `over_cap` (the transform is approximate for it).
        self.equal_norms = equal_norms
        self.cap = 0.0
        self.over_cap = 0
        self._centroids: torch.Tensor | None = None  # (nlist, w) the lists' fixed centroids

    # ------------------------------------------------------------------ building
    @torch.no_grad()
    def build(self, scorer: Scorer) -> None:
        """Index every row of `scorer` from scratch (O(N): startup or a full rebuild)."""
        faiss = self._faiss
        x = _rows(scorer, 0, len(scorer))
        if self.equal_norms:
            self.cap = 1.2 * float(np.sqrt((x * x).sum(axis=1).max())) if len(x) else 1.0
            x = self._stored(x)
        n, w = x.shape
        # 4 sqrt(N) lists (what bench/retrieval.py measured), 39+ training points a list
        nlist = self.nlist or max(16, min(int(4 * np.sqrt(n)), n // 39))
        rng = np.random.default_rng(self.seed)
        sample = x[rng.choice(n, min(n, 40 * nlist), replace=False)]
        quantizer = faiss.IndexFlatIP(w)
        index = faiss.IndexIVFFlat(quantizer, w, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.cp.spherical = True  # unit centroids: assigning by inner product favours none
        index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Array)  # positions are ids: in-place updates
        index.add(x)
        with self.lock:
            self.index, self.size, self.nlist = index, n, nlist
            self.index.nprobe = self.nprobe or max(1, nlist // 8)
        self.quantizer = quantizer  # faiss keeps a raw pointer: keep the Python object alive
        self._centroids = torch.from_numpy(quantizer.reconstruct_n(0, nlist))

    @torch.no_grad()
    def tune(self, scorer: Scorer, queries: torch.Tensor, k: int = 10) -> float:
        """The smallest nprobe whose recall@k against `scorer`'s exact top-k on `queries`
        (B, d) user vectors reaches `target_recall` (doubling, then bisecting the last step:
        search time grows with nprobe, so overshooting 2x costs up to 2x), plus a quarter
        for queries and row updates the tuning did not see; returns that recall and measures the index's speed against the exact scan (`speedup`)."""
        exact = _exact_top(scorer, queries, k)

        def recall_at(nprobe: int) -> float:
            self.index.nprobe = nprobe
            return self._recall(scorer, queries, exact, k)

        low, nprobe = 0, 1  # recall_at(low) < target (0: nothing searched)
        recall = recall_at(nprobe)
        while recall < self.target_recall and nprobe < self.nlist:
            low, nprobe = nprobe, min(2 * nprobe, self.nlist)
            recall = recall_at(nprobe)
        while recall >= self.target_recall and nprobe - low > max(1, nprobe // 8):
            mid = (low + nprobe) // 2
            got = recall_at(mid)
            if got >= self.target_recall:
                nprobe, recall = mid, got
            else:
                low = mid
        if nprobe < self.nlist:  # a margin for other queries and for rows updated later
            nprobe = min(self.nlist, nprobe + max(1, nprobe // 4))
            recall = recall_at(nprobe)
        self.index.nprobe = nprobe
        self.nprobe, self.recall, self.tuned_nprobe = nprobe, recall, nprobe
        self.speedup = self._speedup(scorer, queries[:50], k)
        return recall

    def _recall(self, scorer: Scorer, queries: torch.Tensor, exact: torch.Tensor, k: int
                ) -> float:
        got = self.candidates(scorer, queries, k)
        hits = sum(len(set(g[:k]) & set(e.tolist())) for (g, _), e in zip(got, exact, strict=True))
        return hits / (k * len(queries))

    def refit(self, scorer: Scorer, queries: torch.Tensor, target: float, k: int = 10
              ) -> float | None:
        """Keep this index if it still prunes well: the smallest nprobe, from the tuned one up
        (doubling), whose top-k reaches `target` recall@k against the exact top-k of the
        vectors the index holds, for `queries` (B, d) from `scorer`, searching at most
        1/FIT_LISTS of the lists (or the tuned nprobe, if tuning chose more: a small catalog's
        index, which a rebuild would not improve); that nprobe is then served and its recall
        returned. None when none does (rebuild it). An index tuned on a trained model searches 2-5 lists of
        1,264-4,000; one built on an untrained model needed a quarter of them
        (bench/RESULTS.md). The rows move as the model learns, the lists do not.

        Measured on the index's own vectors (the partition's fit, nothing else): against the
        Scorer's exact top-k, rescored, a just-built 1M index failed at every nprobe up to
        1/32 of its lists in two runs, although tuning had measured recall 1.000 at nprobe 4
        (not understood). The caller must not write rows into the index meanwhile (the
        holder keeps a backlog): the searches here take no lock, so requests do not wait."""
        if self.index is None:
            return None
        q = self._q(_queries(scorer, queries))  # read from `scorer` at once, before it can be reused
        exact = self._stored_top(q, k)
        nprobe = self.index.nprobe
        self.checked: list[tuple[int, float]] = []  # (nprobe, recall) tried, for the log
        most = max(self.nlist // FIT_LISTS, self.tuned_nprobe)
        while nprobe <= most:
            params = self._faiss.SearchParametersIVF()
            params.nprobe = nprobe
            _, got = self.index.search(q, k, params=params)
            hits = sum(len(set(g[g >= 0].tolist()) & set(e[e >= 0].tolist()))
                       for g, e in zip(got, exact, strict=True))
            recall = hits / max(1, int((exact >= 0).sum()))
            self.checked.append((nprobe, recall))
            if recall >= target:
                with self.lock:
                    self.index.nprobe = nprobe
                self.nprobe, self.recall, self.target_recall = nprobe, recall, target
                return recall
            nprobe *= 2
        return None

    def _stored_top(self, q: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
        """(B, k) ids of the exact inner-product top-k of `q` (B, w) over the stored vectors
        (-1 past the end), read back `chunk` rows at a time (one matrix product per chunk)."""
        best_s = torch.full((len(q), k), -torch.inf)
        best_i = torch.full((len(q), k), -1, dtype=torch.long)
        qt = torch.from_numpy(q)
        for start in range(0, self.size, chunk):
            x = torch.from_numpy(self.index.reconstruct_n(start, min(chunk, self.size - start)))
            s = torch.cat([best_s, qt @ x.T], dim=1)
            i = torch.cat([best_i, torch.arange(start, start + len(x)).expand(len(q), -1)], dim=1)
            best_s, top = s.topk(min(k, s.shape[1]), dim=1)
            best_i = i.gather(1, top)
        return best_i.numpy()

    def _speedup(self, scorer: Scorer, queries: torch.Tensor, k: int) -> float:
        """Median time of the fastest exact scan (torch's, or faiss's over fp32 columns) over
        that of this index at the tuned nprobe, >1 meaning faster: the smaller of the ratios
        for one query at a time (a quiet server) and for batches of BUSY_BATCH (a busy one:
        the request batcher hands the scan several queries, which the exact scan answers in
        one pass over the matrix while the index searches each apart). Measured at 100k
        random items: 2.3x for one query, slower than exact for batches of 8 (nprobe 800 of
        1,264 lists), and served, it held 141 req/s where the exact scan had held 713."""
        exact = [_torch_scan] + ([ExactScan().candidates] if _faiss_can_scan(scorer) else [])
        return _times(scorer, queries, k, exact, self.candidates)

    @torch.no_grad()
    def update(self, scorer: Scorer, rows: torch.Tensor) -> None:
        """Write `scorer`'s rows `rows` (k,) (changed ones and every appended one) in place."""
        if self.index is None:
            return
        self._faiss.omp_set_num_threads(1)  # this thread's faiss calls: one core (`ExactScan`)
        rows = rows.to(torch.long)
        old = rows[rows < self.size]
        x_new = self._stored(_rows(scorer, self.size, len(scorer)))
        x_old = self._stored(_take(scorer, old))
        ids = np.ascontiguousarray(old.numpy(), dtype=np.int64)
        if len(ids):  # What `update_vectors` does, with its costly part (finding each row's
            # list) before the lock: searches only read the centroids. Under it faiss moves
            # the rows' codes (an IVFFlat code is the row).
            lists = self._assign(x_old)
            codes = np.ascontiguousarray(x_old, dtype=np.float32).view(np.uint8)
        swig_ptr = self._faiss.swig_ptr
        with self.lock:
            if len(ids):
                self.index.direct_map.update_codes(self.index.invlists, len(ids), swig_ptr(ids),
                                                   swig_ptr(lists), swig_ptr(codes))
            if len(x_new):
                self.index.add(x_new)
            self.size = len(scorer)

    def _assign(self, x: np.ndarray) -> np.ndarray:
        """(m,) each row's list: its nearest centroid by inner product, as the quantizer assigns
        it, by torch's matrix product: the faiss-cpu wheel's own took 2.2-2.8x as long here
        (4,000 rows against 1,264 centroids: 76 vs 34 ms, one thread; against 4,000: 239 vs
        120 ms), the largest part of a swap at 100k items (bench/RESULTS.md, "Issue 8, session
        13"). A near-tie may land a row in the other list: probing order only; scores are exact."""
        assert self._centroids is not None
        return (torch.from_numpy(x) @ self._centroids.T).argmax(dim=1).numpy().astype(np.int64)

    def _stored(self, x: np.ndarray) -> np.ndarray:
        """Rows (m, w) as the index stores them: with `equal_norms`, one more column that
        brings each to norm `cap` (0 for a row past it)."""
        if not self.equal_norms:
            return x
        sq = (x * x).sum(axis=1)
        self.over_cap += int((sq > self.cap ** 2).sum())
        extra = np.sqrt(np.maximum(self.cap ** 2 - sq, 0.0)).astype(np.float32)
        return np.ascontiguousarray(np.concatenate([x, extra[:, None]], axis=1))

    def _q(self, q: np.ndarray) -> np.ndarray:
        """Queries (B, w) as the index searches with them: a zero for the extra column."""
        if not self.equal_norms:
            return q
        return np.ascontiguousarray(np.concatenate([q, np.zeros((len(q), 1), np.float32)], 1))

    # ------------------------------------------------------------------ searching
    @torch.no_grad()
    def candidates(self, scorer: Scorer, users: torch.Tensor, want: int, offer: bool = True
                   ) -> list[tuple[list[int], list[float]]]:
        """Up to `want` + overfetch candidate positions per user (B, d), best first, with their
        exact scores from `scorer`'s own columns (not divided by the temperature). `offer`:
        hand the users to `on_query` (the served-recall monitor's sample)."""
        q = _queries(scorer, users)
        self._faiss.omp_set_num_threads(1)  # see `ExactScan`
        with self.lock:
            _, idx = self.index.search(self._q(q), want + self.overfetch)
        if offer and self.on_query is not None:
            self.on_query(users)
        return _rescored(scorer, q, idx)


class RecallMonitor:
    """Served recall@k of the ANN index, measured on the users it actually serves.

    The index's own figures (`tune` at build, `refit` at each check) are measured on sampled
    3-item histories at one moment; between checks the rows move as versions arrive. This
    keeps a few of the user vectors that real requests searched with (`offer`, from the
    request path: a timestamp comparison per search, a copy of one row per sample), and now
    and then (`measure`, on a thread of its own) asks the served index and the exact scan of
    the served Scorer for their top-k for them: what users get, against what they would get
    without the index. `window` is the rolling mean over the last `window_queries` queries,
    `total` the run's. The recent vectors (`pool`, up to `pool_size`) are also what the index
    is tuned and checked on: real queries, not synthetic histories (at 100k items an index
    tuned to recall 1.000 on 3-item random histories served 0.90)."""

    def __init__(self, every_s: float = 10.0, batch: int = 8, window_queries: int = 96,
                 k: int = 10, pool_size: int = 256) -> None:
        from collections import deque

        self.every_s, self.batch, self.k = every_s, batch, k
        self._queued: deque[torch.Tensor] = deque(maxlen=batch)
        self._pool: deque[torch.Tensor] = deque(maxlen=pool_size)
        self._next_offer = self._next_pool = 0.0
        # (hits, asked) per measurement, for the last `window_queries` queries or so
        self._recent: deque[tuple[int, int]] = deque(maxlen=max(1, window_queries // batch))
        self.hits = self.asked = 0
        self.measured_at = 0.0

    def offer(self, users: torch.Tensor) -> None:
        """A search's users (B, d): one is kept for the pool (at most `pool_size` per `every_s`)
        and for measuring (at most `batch` per `every_s`)."""
        now = time.monotonic()
        if now < self._next_pool or not len(users):
            return
        self._next_pool = now + self.every_s / self._pool.maxlen  # type: ignore[operator]
        user = users[0].detach().clone()
        self._pool.append(user)
        if now >= self._next_offer:
            self._next_offer = now + self.every_s / self.batch
            self._queued.append(user)

    def pool(self, n: int) -> torch.Tensor | None:
        """(m, d) the last m <= `n` query vectors requests searched with; None when fewer
        than `n` // 2 were kept yet."""
        recent = list(self._pool)[-n:]
        return torch.stack(recent) if recent and len(recent) >= n // 2 else None

    def reset(self) -> None:
        """A new index serves: the window starts again (the run's totals go on)."""
        self._recent.clear()

    @torch.no_grad()
    def measure(self, scorer: Scorer, index: AnnIndex) -> float | None:
        """The queued users' recall@k through `index` against the exact scan of `scorer`;
        None when nothing was queued."""
        users = [self._queued.popleft() for _ in range(len(self._queued))]
        if not users:
            return None
        q = torch.stack(users)
        exact = _exact_top(scorer, q, min(self.k, len(scorer)))
        got = index.candidates(scorer, q, self.k, offer=False)
        hits = sum(len(set(g[: self.k]) & set(e.tolist()))
                   for (g, _), e in zip(got, exact, strict=True))
        asked = exact.numel()
        self._recent.append((hits, asked))
        self.hits, self.asked = self.hits + hits, self.asked + asked
        self.measured_at = time.monotonic()
        return hits / asked

    @property
    def window(self) -> float | None:
        asked = sum(a for _, a in self._recent)
        return sum(h for h, _ in self._recent) / asked if asked else None

    @property
    def window_queries(self) -> int:
        return sum(a for _, a in self._recent) // self.k

    @property
    def window_full(self) -> bool:
        return len(self._recent) == self._recent.maxlen

    @property
    def total(self) -> float | None:
        return self.hits / self.asked if self.asked else None


FIT_LISTS = 32  # an index that must search more than 1/32 of its lists is rebuilt, not kept


@torch.no_grad()
def _exact_top(scorer: Scorer, queries: torch.Tensor, k: int, chunk: int = 25) -> torch.Tensor:
    """(B, k) positions of the exact top-k, `chunk` queries at a time (at 1M items, 200
    queries' scores at once took 800 MB)."""
    return torch.cat([scorer.scores(queries[i: i + chunk]).topk(k).indices
                      for i in range(0, len(queries), chunk)])


class ExactScan:
    """Exact top-k candidates from faiss's exhaustive inner-product scan over the Scorer's own
    fp32 columns (no index, no copy: the live left-right buffer is read in place), rescored
    with the Scorer's torch columns like the IVF candidates, so a lone request's scores are
    bit for bit the learner's (`Scorer.rank_batch`) and exclusion stays exact.

    Why not torch's own scan: this build's torch multiplies with MKL, whose single-query GEMV
    is 2.2-5.5x slower than faiss's scan on this (AMD) CPU at 100k-1M items, even with the
    generic (non-AVX2) faiss build the faiss-cpu wheel loads here
    (bench/RESULTS.md, "Retrieval at 100k and 1M items"). Batches of `blas_from` queries or
    more use faiss's BLAS path (one pass over the matrix for the whole batch).

    Each search runs on one OpenMP thread, set in the calling thread (OpenMP keeps the setting
    per thread): with faiss's default of one OpenMP team per call, 16 request threads each
    spinning up a team on 2 cores served 3x fewer requests than torch's scan
    (bench/batching.py)."""

    margin = 10  # candidates beyond k + excluded: near-ties that round differently in faiss
    recall = 1.0
    nprobe = None
    fallbacks = 0

    def __init__(self, blas_from: int = 4) -> None:
        import faiss

        self._faiss = faiss
        faiss.cvar.distance_compute_blas_threshold = blas_from

    @torch.no_grad()
    def candidates(self, scorer: Scorer, users: torch.Tensor, want: int
                   ) -> list[tuple[list[int], list[float]]]:
        """`want` + margin exact candidates per user (B, d), best first, with the scores of
        `scorer`'s own columns (not divided by the temperature)."""
        q = _queries(scorer, users)
        self._faiss.omp_set_num_threads(1)  # per calling thread: see the class docstring
        cols = scorer.cols if scorer.linear else scorer.items
        n = len(scorer)
        _, idx = self._faiss.knn(q, cols.numpy(), min(n, want + self.margin),
                                 metric=self._faiss.METRIC_INNER_PRODUCT)
        return _rescored(scorer, q, idx)


def _rescored(scorer: Scorer, q: np.ndarray, idx: np.ndarray
              ) -> list[tuple[list[int], list[float]]]:
    """Candidate positions `idx` (B, m) (-1 = none) rescored row by row with `scorer`'s
    stored columns, best first."""
    out: list[tuple[list[int], list[float]]] = []
    n = len(scorer)
    stored = _stored(scorer)
    for row in range(len(idx)):
        cand = idx[row][(idx[row] >= 0) & (idx[row] < n)]
        if not len(cand):
            out.append(([], []))
            continue
        c = torch.from_numpy(cand)
        s = quant.scores(torch.from_numpy(q[row: row + 1]), stored[c], scorer.dtype)[0]
        top = s.sort(descending=True)
        out.append((c[top.indices].tolist(), top.values.tolist()))
    return out


def _stored(scorer: Scorer) -> torch.Tensor:
    return scorer.cols if scorer.linear else scorer.items


def _queries(scorer: Scorer, users: torch.Tensor) -> np.ndarray:
    q = scorer._queries(users)
    return np.ascontiguousarray(q.detach().to(torch.float32).numpy())


def _rows(scorer: Scorer, start: int, stop: int) -> np.ndarray:
    stored = _stored(scorer)[start:stop]
    return np.ascontiguousarray(quant.decode(stored, scorer.dtype, scorer.width).numpy())


def _take(scorer: Scorer, idx: torch.Tensor) -> np.ndarray:
    stored = _stored(scorer)[idx]
    return np.ascontiguousarray(quant.decode(stored, scorer.dtype, scorer.width).numpy())


def _torch_scan(scorer: Scorer, users: torch.Tensor, want: int) -> Any:
    """What `Scorer.rank_batch` does without a candidate source: torch's scan and top-k."""
    return scorer.scores(users).topk(min(want, len(scorer)), dim=1)


def _faiss_can_scan(scorer: Scorer) -> bool:
    return scorer.dtype == "fp32" and scorer.linear


def _times(scorer: Scorer, queries: torch.Tensor, k: int, slow: list[Any], fast: Any
           ) -> float:
    """min over batch sizes (1, BUSY_BATCH) of: median time of the fastest of `slow` over the
    median time of `fast`, each proposing k candidates for `queries` (B, d), interleaved (a
    busy neighbour slows all alike)."""
    ratios = []
    for size in (1, BUSY_BATCH):
        times: dict[Any, list[float]] = {f: [] for f in [*slow, fast]}
        for start in range(0, len(queries) - size + 1, size):
            for propose, out in times.items():
                t0 = time.perf_counter()
                propose(scorer, queries[start: start + size], k)
                out.append(time.perf_counter() - t0)
        best = min(float(np.median(times[f])) for f in slow)
        ratios.append(best / float(np.median(times[fast])))
    return float(min(ratios))


@torch.no_grad()
def scan_speedup(scorer: Scorer, users: torch.Tensor, k: int = 10) -> float:
    """How much faster faiss's exact scan (`ExactScan`) proposes candidates than torch's scan
    over `scorer`, for `users` (B, d): the smaller ratio of one query at a time and batches of
    BUSY_BATCH. Which is faster depends on the CPU: on the AMD machine of the first
    measurements faiss was 2.2-5.5x faster, on an Intel Xeon later torch was 2x faster for
    batches (faiss's BLAS path) and even for one query (bench/RESULTS.md)."""
    return _times(scorer, users, k, [_torch_scan], ExactScan().candidates)

