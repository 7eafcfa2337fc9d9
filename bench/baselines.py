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
    """Most-interacted items so far (all-time streaming counts)."""

    name = "popularity"

    def __init__(self) -> None:
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
