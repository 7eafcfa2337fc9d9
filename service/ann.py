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
from typing import Any

import numpy as np
import torch

from model import quant
from model.scorer import Scorer

log = logging.getLogger("freshrec.service")


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
                 target_recall: float = 0.97, seed: int = 0) -> None:
        import faiss

        self._faiss = faiss
        self.nlist, self.nprobe, self.overfetch = nlist, nprobe, overfetch
        self.target_recall, self.seed = target_recall, seed
        self.index: Any = None
        self.size = 0  # rows indexed (positions 0 .. size-1)
        self.recall: float | None = None  # recall@10 measured by `tune`
        self.lock = threading.Lock()
        self.fallbacks = 0  # requests answered by the exact scan after all

    # ------------------------------------------------------------------ building
    @torch.no_grad()
    def build(self, scorer: Scorer) -> None:
        """Index every row of `scorer` from scratch (O(N): startup or a full rebuild)."""
        faiss = self._faiss
        x = _rows(scorer, 0, len(scorer))
        n, w = x.shape
        nlist = self.nlist or max(16, int(np.sqrt(n)))  # faiss: 39+ points a list
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

    @torch.no_grad()
    def tune(self, scorer: Scorer, queries: torch.Tensor, k: int = 10) -> float:
        """The smallest nprobe (doubling) whose recall@k against `scorer`'s exact top-k on
        `queries` (B, d) user vectors reaches `target_recall`; returns that recall."""
        exact = scorer.scores(queries).topk(k).indices
        nprobe = 1
        while True:
            self.index.nprobe = nprobe
            got = self.candidates(scorer, queries, k)
            hits = sum(len(set(g[:k]) & set(e.tolist()))
                       for (g, _), e in zip(got, exact, strict=True))
            recall = hits / (k * len(queries))
            if recall >= self.target_recall or nprobe >= self.nlist:
                break
            nprobe = min(2 * nprobe, self.nlist)
        self.nprobe, self.recall = nprobe, recall
        return recall

    @torch.no_grad()
    def update(self, scorer: Scorer, rows: torch.Tensor) -> None:
        """Write `scorer`'s rows `rows` (k,) (changed ones and every appended one) in place."""
        if self.index is None:
            return
        rows = rows.to(torch.long)
        old = rows[rows < self.size]
        x_new = _rows(scorer, self.size, len(scorer))
        x_old = _take(scorer, old)
        with self.lock:
            if len(old):
                self.index.update_vectors(old.numpy().astype(np.int64), x_old)
            if len(x_new):
                self.index.add(x_new)
            self.size = len(scorer)

    # ------------------------------------------------------------------ searching
    @torch.no_grad()
    def candidates(self, scorer: Scorer, users: torch.Tensor, want: int
                   ) -> list[tuple[list[int], list[float]]]:
        """Up to `want` + overfetch candidate positions per user (B, d), best first, with their
        exact scores from `scorer`'s own columns (not divided by the temperature)."""
        q = _queries(scorer, users)
        with self.lock:
            _, idx = self.index.search(q, want + self.overfetch)
        out: list[tuple[list[int], list[float]]] = []
        n = len(scorer)
        for row in range(len(idx)):
            cand = idx[row][(idx[row] >= 0) & (idx[row] < n)]
            if not len(cand):
                out.append(([], []))
                continue
            c = torch.from_numpy(cand)
            s = quant.scores(torch.from_numpy(q[row: row + 1]), _stored(scorer)[c],
                             scorer.dtype)[0]
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
