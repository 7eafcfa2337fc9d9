"""The server's side of the linear item tower: what lets a new version cost the rows it changed.

`LinearCatalog` keeps, per catalog item, the fixed text projection t = unit(text @ basis)
(computed once when the item's features arrive or change; all of them again only if a version
brings another basis), the vocabulary of the ID table being served (append-only, shared by the
Scorers of one lineage) and the catalog items outside it. From these it builds a version's
Scorer in full, or from the previous Scorer by rewriting only the rows whose ID row changed (the
deltas' `id_emb.rows`), whose text changed, and appended or not-yet-learned items.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np
import torch

from model.scorer import ItemNames, Scorer, fixed_projection
from model.towers import TwoTower

CHUNK = 65_536  # texts projected per matmul when every item is projected (bounds memory)


class LinearCatalog:
    """Cached projections and the served vocabulary; used by the holder's one builder thread."""

    def __init__(self, text: Mapping[str, np.ndarray], dtype: str = "fp32") -> None:
        self.dtype = dtype  # how the Scorers built here store the item matrix (model/quant.py)
        self._text = text  # the holder's item id -> text features (H,), read only
        self._basis: torch.Tensor | None = None  # (H, k) the projections below were made with
        self._proj = torch.zeros(1, 0)  # (capacity, k); row 0 stays zero: "no text features"
        self._proj_row: dict[str, int] = {}
        self._changed: set[str] = set()  # texts new or changed since the last build
        self._vocab: list[str] = []  # the served lineage's ID-table order (append-only)
        self._index: dict[str, int] = {}
        self._extras: dict[str, None] = {}  # catalog items outside the vocabulary, in order

    def items_changed(self, ids: Iterable[str]) -> None:
        """Items whose text features arrived or changed (new catalog items among them)."""
        for item in ids:
            self._changed.add(item)
            if item not in self._index:
                self._extras[item] = None

    def full(self, net: TwoTower, ids: Sequence[str], table: torch.Tensor,
             catalog: Collection[str]) -> Scorer:
        """A Scorer over `ids` (the ID table `table` (N, d) names them) plus the catalog items
        they lack, from scratch: O(N), but from cached projections, not from the texts."""
        self._project(net)
        self._vocab = list(ids)
        self._index = {item: i for i, item in enumerate(self._vocab)}
        self._extras = {item: None for item in catalog if item not in self._index}
        names = ItemNames(self._vocab, self._index, len(self._vocab), list(self._extras))
        base = self._bases(self._vocab + names.tail) if net.cfg.text else None
        scorer = Scorer(net, table.new_zeros(0, 0), names, base=base, ids=table,
                        dtype=self.dtype)
        self._changed.clear()
        return scorer

    def updated(self, prev: Scorer, net: TwoTower, ids: Sequence[str], table: torch.Tensor,
                rows: torch.Tensor) -> Scorer | None:
        """The Scorer of a version whose ID table `table` (N, d), naming `ids`, differs from
        `prev`'s only in `rows` (k,) and appended ids; None when `prev` is not this lineage's
        newest (then build in full). Costs O(rows + appended + texts changed + items outside
        the ID table)."""
        n_old = len(self._vocab)
        if prev.names.prefix is not self._vocab or prev.names.n != n_old or len(ids) < n_old:
            return None
        added = ids[n_old:]
        if any(item in self._index for item in added):
            return None
        if net.cfg.text and (self._basis is None or not torch.equal(basis_of(net), self._basis)):
            return None  # another basis: every projection changes
        self._project(net)
        for item in added:
            self._index[item] = len(self._vocab)
            self._vocab.append(item)
            self._extras.pop(item, None)
        names = ItemNames(self._vocab, self._index, len(self._vocab), list(self._extras))
        moved = [p for p in map(self._index.get, self._changed) if p is not None and p < n_old]
        rows = rows.to(torch.long)
        rows = torch.cat([rows[rows < n_old], torch.tensor(moved, dtype=torch.long),
                          torch.arange(n_old, len(names))]).unique()  # (k,): all from n_old on
        in_table = rows < len(ids)
        id_rows = table.new_zeros(len(rows), table.shape[1])  # (k, d); zero: not learned yet
        if net.cfg.id_embedding:
            id_rows[in_table] = table[rows[in_table]]
        base = self._bases([names.name(j) for j in rows.tolist()]) if net.cfg.text else None
        scorer = prev.updated(net, names, rows, id_rows, base)
        self._changed.clear()
        return scorer

    def _bases(self, items: Sequence[str]) -> torch.Tensor:
        """(k, kb) cached projections of `items`; zero for an item without text features."""
        idx = torch.tensor([self._proj_row.get(item, 0) for item in items], dtype=torch.long)
        return self._proj[idx]

    def _project(self, net: TwoTower) -> None:
        """Project the texts that arrived or changed since the last build; every text when
        `net` brings another basis than the cached projections were made with."""
        if not net.cfg.text:
            return
        basis = basis_of(net)
        if self._basis is None or not torch.equal(basis, self._basis):
            self._basis = basis.detach().clone()
            self._proj = torch.zeros(1 + len(self._text), basis.shape[1])
            self._proj_row = {}
            todo = list(self._text)
        else:
            todo = [item for item in self._changed if item in self._text]
        for start in range(0, len(todo), CHUNK):
            part = todo[start: start + CHUNK]
            feats = torch.from_numpy(np.stack([self._text[item] for item in part]))  # (m, H)
            proj = fixed_projection(net, feats.to(torch.float32))  # (m, k)
            rows = []
            for item in part:
                row = self._proj_row.get(item)
                if row is None:
                    row = self._proj_row[item] = len(self._proj_row) + 1
                rows.append(row)
            if max(rows) >= self._proj.shape[0]:
                grown = torch.zeros(2 * max(rows) + 1, self._proj.shape[1])
                grown[: self._proj.shape[0]] = self._proj
                self._proj = grown
            self._proj[torch.tensor(rows)] = proj


def basis_of(net: TwoTower) -> torch.Tensor:
    """The linear tower's fixed (H, k) text basis."""
    basis = net.adapter.basis
    assert isinstance(basis, torch.Tensor)
    return basis
