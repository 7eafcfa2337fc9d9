"""Streaming baselines behind the one interface the quality harness drives.

A method sees the whole catalog once (`add_items`), learns from micro-batches of events in event
order (`learn`), and ranks the full catalog for many users at once (`rank_batch`) from each
user's recent items. A method that also wants user ids (matrix factorisation) says so with
``wants_user_ids = True``; the harness then passes ``users=`` as well.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Collection, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from freshrec.data import Interaction, Item

__all__ = [
    "Catalog",
    "ImplicitALS",
    "ItemKNN",
    "Popularity",
    "RiverMF",
    "StreamingRecommender",
    "top_k",
]


@runtime_checkable
class StreamingRecommender(Protocol):
    """What the quality harness drives: learn in event order, rank the full catalog."""

    name: str

    def add_items(self, items: Sequence[Item]) -> None:
        """Make items known (the harness passes the whole catalog up front)."""

    def learn(self, batch: Sequence[Interaction]) -> None:
        """Learn from a micro-batch of events, given in event order. Must not mutate it."""

    def rank_batch(
        self, histories: Sequence[Sequence[str]], k: int, exclude: Sequence[Collection[str]]
    ) -> list[list[str]]:
        """Top-`k` item ids for each user, best first, never naming an item of `exclude[i]`.

        `histories[i]` holds user i's recent item ids, oldest first: the events before the one
        being predicted.
        """
        ...


class Catalog:
    """Item id <-> dense row index; grows when new ids appear."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, item_ids: Sequence[str]) -> np.ndarray:
        """Indices of `item_ids`, adding the unknown ones at the end."""
        out = np.empty(len(item_ids), dtype=np.int64)
        for n, item_id in enumerate(item_ids):
            idx = self.index.get(item_id)
            if idx is None:
                idx = self.index[item_id] = len(self.ids)
                self.ids.append(item_id)
            out[n] = idx
        return out

    def known(self, item_ids: Sequence[str] | Collection[str]) -> list[int]:
        """Indices of the known ids among `item_ids` (unknown ones are skipped)."""
        index = self.index
        return [index[i] for i in item_ids if i in index]


def top_k(
    scores: np.ndarray, k: int, exclude: Sequence[Collection[str]], catalog: Catalog
) -> list[list[str]]:
    """Best `k` ids per row of `scores` (B, n), skipping excluded ids. Modifies `scores`."""
    rows, cols = [], []
    for b, items in enumerate(exclude):
        idx = catalog.known(items)
        rows.extend([b] * len(idx))
        cols.extend(idx)
    if rows:
        scores[rows, cols] = -np.inf
    n = scores.shape[1]
    kk = min(k, n)
    if kk == 0:
        return [[] for _ in range(scores.shape[0])]
    part = (
        np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        if kk < n
        else np.tile(np.arange(n), (scores.shape[0], 1))
    )
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    best_scores = np.take_along_axis(part_scores, order, axis=1)
    ids = catalog.ids
    return [
        [ids[j] for j, s in zip(row, srow, strict=True) if s != -np.inf]
        for row, srow in zip(best.tolist(), best_scores.tolist(), strict=True)
    ]


class Popularity:
    """Most-interacted items so far, each event's count decaying with age.

    An event `a` events old counts ``0.5 ** (a / halflife)``: the same exponential forgetting,
    in events, as the item-frequency estimate behind the neural model's logQ correction
    (`ModelConfig.logq_halflife`, 5,000 events), so both see the same notion of "popular now".
    ``halflife=0`` counts all time (the old baseline, `popularity-alltime`).
    """

    name = "popularity"

    def __init__(self, halflife: float = 0.0) -> None:
        if halflife < 0:
            raise ValueError(f"halflife must be >= 0 events (0: all time), got {halflife}")
        self.halflife = halflife
        self.catalog = Catalog()
        self.counts = np.zeros(0)

    def _grow(self) -> None:
        if len(self.catalog) > len(self.counts):
            self.counts = np.concatenate(
                [self.counts, np.zeros(len(self.catalog) - len(self.counts))]
            )

    def add_items(self, items: Sequence[Item]) -> None:
        """Make items known (count 0)."""
        self.catalog.add([it.item_id for it in items])
        self._grow()

    def learn(self, batch: Sequence[Interaction]) -> None:
        """Count each event's item."""
        idx = self.catalog.add([e.item_id for e in batch])
        self._grow()
        if self.halflife > 0:
            n = len(idx)
            self.counts *= 0.5 ** (n / self.halflife)
            np.add.at(self.counts, idx, 0.5 ** (np.arange(n - 1, -1, -1) / self.halflife))
        else:
            np.add.at(self.counts, idx, 1.0)

    def rank_batch(
        self, histories: Sequence[Sequence[str]], k: int, exclude: Sequence[Collection[str]]
    ) -> list[list[str]]:
        """The same popularity order for everyone, minus each user's excluded items."""
        order = np.argsort(-self.counts, kind="stable")
        ids = self.catalog.ids
        out = []
        for excl in exclude:
            row: list[str] = []
            for j in order:
                item_id = ids[j]
                if item_id not in excl:
                    row.append(item_id)
                    if len(row) == k:
                        break
            out.append(row)
        return out


class ItemKNN:
    """Streaming item-item co-occurrence with cosine normalisation.

    Each event (u, i) adds ``decay**(d-1)`` to the co-occurrence of i with the item d steps back
    in u's last `window` items, symmetrically. Similarity is cosine-like:
    ``sim(i, j) = C[i, j] / sqrt(n_i * n_j)`` with ``n_i`` the occurrences of i. A user's score
    for candidate c is ``sum_h decay**age(h) * sim(h, c)`` over the last `window` history items;
    popularity breaks ties, so a user with no usable history gets the popularity order.
    C is a scipy CSR matrix; each `learn` merges its batch's updates in one sparse add.
    """

    name = "itemknn"

    def __init__(self, window: int = 20, decay: float = 0.9) -> None:
        if window < 1 or not 0.0 < decay <= 1.0:
            raise ValueError("window must be >= 1 and decay in (0, 1]")
        self.window = window
        self.decay = decay
        self.catalog = Catalog()
        self.counts = np.zeros(0)
        self.co = sp.csr_matrix((0, 0), dtype=np.float64)
        self.recent: dict[str, deque[int]] = {}
        self._weights = decay ** np.arange(window)  # weight of the item d+1 steps back

    def _grow(self) -> None:
        n = len(self.catalog)
        if n > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(n - len(self.counts))])
            self.co.resize((n, n))

    def add_items(self, items: Sequence[Item]) -> None:
        """Make items known (no co-occurrences yet)."""
        self.catalog.add([it.item_id for it in items])
        self._grow()

    def learn(self, batch: Sequence[Interaction]) -> None:
        """Add each event's co-occurrences with the user's previous `window` items."""
        idx = self.catalog.add([e.item_id for e in batch])
        self._grow()
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        weights = self._weights.tolist()
        for event, i in zip(batch, idx.tolist(), strict=True):
            prev = self.recent.get(event.user_id)
            if prev is None:
                prev = self.recent[event.user_id] = deque(maxlen=self.window)
            for d, j in enumerate(reversed(prev)):
                if j != i:
                    rows += (i, j)
                    cols += (j, i)
                    vals += (weights[d], weights[d])
            prev.append(i)
        np.add.at(self.counts, idx, 1.0)
        if vals:
            n = len(self.catalog)
            self.co = self.co + sp.csr_matrix((vals, (rows, cols)), shape=(n, n))

    def rank_batch(
        self, histories: Sequence[Sequence[str]], k: int, exclude: Sequence[Collection[str]]
    ) -> list[list[str]]:
        """Rank by summed, recency-weighted cosine similarity to each user's recent items."""
        n = len(self.catalog)
        inv_sqrt = np.zeros(n)
        seen = self.counts > 0
        inv_sqrt[seen] = 1.0 / np.sqrt(self.counts[seen])
        rows, cols, vals = [], [], []
        for b, hist in enumerate(histories):
            recent = self.catalog.known(list(hist)[-self.window :])
            for age, j in enumerate(reversed(recent)):
                rows.append(b)
                cols.append(j)
                vals.append(self._weights[age] * inv_sqrt[j])
        weights = sp.csr_matrix((vals, (rows, cols)), shape=(len(histories), n))
        scores = np.asarray((weights @ self.co).todense()) * inv_sqrt  # (B, n)
        if n:
            scores += 1e-9 * self.counts / max(1.0, self.counts.max())
        return top_k(scores, k, exclude, self.catalog)


class RiverMF:
    """River's online biased MF (`river.reco.BiasedMF`) on implicit feedback.

    Each event is a positive (label 1) followed by `n_negatives` items drawn uniformly from the
    catalog (label 0), all fed to ``learn_one`` with the logistic loss. Ranking does not call
    ``predict_one`` per item: the learned item factors and biases are mirrored in numpy arrays
    (refreshed for the items each batch touched) and scored with one matrix product. A user
    unseen in training is folded in as the mean factor of their history items (zero without
    history, which leaves the item biases: a popularity-like order).
    """

    name = "river_mf"
    wants_user_ids = True

    def __init__(
        self,
        n_factors: int = 32,
        lr: float = 0.2,  # best of a small sweep on the ML-100K stream (0.02-0.5)
        l2: float = 1e-4,
        n_negatives: int = 4,
        seed: int = 0,
    ) -> None:
        from river import optim, reco

        self.n_factors = n_factors
        self.n_negatives = n_negatives
        self.model = reco.BiasedMF(
            n_factors=n_factors,
            bias_optimizer=optim.SGD(lr),
            latent_optimizer=optim.SGD(lr),
            loss=optim.losses.Log(),
            l2_bias=l2,
            l2_latent=l2,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
            seed=seed,
        )
        self.rng = random.Random(seed)
        self.catalog = Catalog()
        self.item_factors = np.zeros((0, n_factors))
        self.item_bias = np.zeros(0)

    def _grow(self) -> None:
        n, have = len(self.catalog), len(self.item_bias)
        if n > have:
            self.item_factors = np.vstack([self.item_factors, np.zeros((n - have, self.n_factors))])
            self.item_bias = np.concatenate([self.item_bias, np.zeros(n - have)])

    def add_items(self, items: Sequence[Item]) -> None:
        """Make items known (zero factors until trained on)."""
        self.catalog.add([it.item_id for it in items])
        self._grow()

    def learn(self, batch: Sequence[Interaction]) -> None:
        """One SGD step per positive and per sampled negative."""
        self.catalog.add([e.item_id for e in batch])
        self._grow()
        ids, n = self.catalog.ids, len(self.catalog)
        touched: set[str] = set()
        learn_one = self.model.learn_one
        for event in batch:
            learn_one(event.user_id, event.item_id, 1)
            touched.add(event.item_id)
            for _ in range(self.n_negatives):
                neg = ids[self.rng.randrange(n)]
                if neg != event.item_id:
                    learn_one(event.user_id, neg, 0)
                    touched.add(neg)
        rows = self.catalog.known(touched)
        self.item_factors[rows] = [self.model.i_latents[ids[r]] for r in rows]
        self.item_bias[rows] = [self.model.i_biases[ids[r]] for r in rows]

    def rank_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int,
        exclude: Sequence[Collection[str]],
        users: Sequence[str] | None = None,
    ) -> list[list[str]]:
        """Score every item by ``bias_i + p_u . q_i`` in one matrix product."""
        user_vecs = np.zeros((len(histories), self.n_factors))
        latents = self.model.u_latents
        for b, hist in enumerate(histories):
            user = users[b] if users is not None else None
            if user is not None and user in latents:  # `in` does not create a default entry
                user_vecs[b] = latents[user]
            else:
                rows = self.catalog.known(hist)
                if rows:
                    user_vecs[b] = self.item_factors[rows].mean(axis=0)
        scores = user_vecs @ self.item_factors.T + self.item_bias  # (B, n)
        return top_k(scores, k, exclude, self.catalog)


class ImplicitALS:
    """The batch-training peer: `implicit`'s ALS refitted from scratch every `retrain_every` events.

    Between refits the item factors stay fixed and each ranked user is folded in with one exact
    ALS user step over the items they interacted with (those learned plus the history the
    harness passes): ``x_u = (YᵀY + (alpha - 1) Y_uᵀY_u + reg I)⁻¹ alpha Y_uᵀ 1``, so a new
    user or a user's newest events count at once, as they do for the streaming methods.
    Until the first fit it ranks by popularity. Hyperparameters and `retrain_every` were chosen
    on the ML-100K dev split (bench/RESULTS.md, "Honest quality").
    """

    name = "als"
    wants_user_ids = True

    def __init__(self, factors: int = 64, regularization: float = 0.05, alpha: float = 1.0,
                 iterations: int = 15, retrain_every: int = 5000, seed: int = 0) -> None:
        if retrain_every < 1 or factors < 1 or alpha < 1:
            raise ValueError("retrain_every and factors must be >= 1, alpha >= 1")
        self.factors, self.regularization, self.alpha = factors, regularization, alpha
        self.iterations, self.retrain_every, self.seed = iterations, retrain_every, seed
        self.catalog = Catalog()
        self.counts = np.zeros(0)
        self.users: dict[str, int] = {}
        self.user_items: dict[str, set[int]] = {}
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.item_factors: np.ndarray | None = None  # (n_items_at_fit, f)
        self.since_fit = 0
        self.fits = 0

    def _grow(self) -> None:
        if len(self.catalog) > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(len(self.catalog) - len(self.counts))])

    def add_items(self, items: Sequence[Item]) -> None:
        """Make items known (zero factors until a fit has seen them)."""
        self.catalog.add([it.item_id for it in items])
        self._grow()

    def learn(self, batch: Sequence[Interaction]) -> None:
        """Record the events; refit once `retrain_every` events arrived since the last fit."""
        idx = self.catalog.add([e.item_id for e in batch])
        self._grow()
        np.add.at(self.counts, idx, 1.0)
        for event, i in zip(batch, idx.tolist(), strict=True):
            u = self.users.setdefault(event.user_id, len(self.users))
            self.user_items.setdefault(event.user_id, set()).add(i)
            self.rows.append(u)
            self.cols.append(i)
        self.since_fit += len(batch)
        if self.since_fit >= self.retrain_every:
            self.fit()

    def fit(self) -> None:
        """Retrain from scratch on every event learned so far."""
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        n_users, n_items = max(len(self.users), 1), len(self.catalog)
        mat = sp.csr_matrix((np.ones(len(self.rows), dtype=np.float32), (self.rows, self.cols)),
                            shape=(n_users, n_items))
        mat.data[:] = 1.0  # a repeat counts once, as the exclusions do
        with threadpool_limits(1):
            model = AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, alpha=self.alpha,
                iterations=self.iterations, num_threads=1, random_state=self.seed + self.fits,
            )
            model.fit(mat, show_progress=False)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float64)
        self.since_fit = 0
        self.fits += 1

    def rank_batch(
        self, histories: Sequence[Sequence[str]], k: int, exclude: Sequence[Collection[str]],
        users: Sequence[str] | None = None,
    ) -> list[list[str]]:
        """Fold each user in over their items, then score every item by ``x_u . y_i``."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # small solves: a BLAS thread pool only waits on busy cores
            return self._rank(histories, k, exclude, users)

    def _rank(
        self, histories: Sequence[Sequence[str]], k: int, exclude: Sequence[Collection[str]],
        users: Sequence[str] | None,
    ) -> list[list[str]]:
        n = len(self.catalog)
        pop = 1e-9 * self.counts / max(1.0, float(self.counts.max()) if n else 1.0)
        scores = np.tile(pop, (len(histories), 1))  # (B, n)
        if self.item_factors is None and self.rows:
            self.fit()
        y = self.item_factors
        if y is not None:
            y = np.vstack([y, np.zeros((n - len(y), y.shape[1]))]) if len(y) < n else y
            gram = y.T @ y + self.regularization * np.eye(y.shape[1])
            for b, hist in enumerate(histories):
                items = set(self.catalog.known(hist))
                if users is not None:
                    items |= self.user_items.get(users[b], set())
                if not items:
                    continue
                yu = y[sorted(items)]
                x = np.linalg.solve(gram + (self.alpha - 1.0) * yu.T @ yu,
                                    self.alpha * yu.sum(axis=0))
                scores[b] += y @ x
        return top_k(scores, k, exclude, self.catalog)
