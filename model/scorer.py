"""Ranking with a frozen snapshot of the towers: the one path used by the learner and the server.

With `item_tower="linear"` a new version changes the candidate side only in the ID rows it
touched and in appended items, so the next Scorer is built from the previous one in time
proportional to those rows (`Scorer.updated`), never to the catalog. How the per-item columns are
stored so that this stays atomic for readers is `ColumnStore`'s docstring.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model import quant
from model.towers import TwoTower, id_scale, split_row

HEADROOM = 1.25  # a column buffer holds this many times the rows it needs: appends are amortised
MAX_LOG = 64  # generations of changed rows kept; a buffer further behind is refreshed by memcpy
MIN_ROWS = 16  # CPU GEMMs of 1-3 rows take another kernel and round differently: pad up to this


class ItemNames:
    """Item ids by position: an append-only prefix shared by successive Scorers (each reads only
    its first `n`, so appending for the next version never changes what an older one sees) and a
    small private tail (catalog items the version's ID table does not name yet).

    The learner passes its own `item_ids` / `index` (append-only too), so a rebuild copies no
    names; the server extends one vocabulary per lineage of incremental builds.
    """

    __slots__ = ("prefix", "index", "n", "tail", "tail_index")

    def __init__(self, prefix: list[str], index: dict[str, int], n: int,
                 tail: Sequence[str] = ()) -> None:
        self.prefix, self.index, self.n = prefix, index, n
        self.tail = list(tail)
        self.tail_index = {item: j for j, item in enumerate(self.tail)}

    @classmethod
    def of(cls, item_ids: Sequence[str]) -> ItemNames:
        """Private names for a list of ids (a full build)."""
        ids = list(item_ids)
        return cls(ids, {item: i for i, item in enumerate(ids)}, len(ids))

    def position(self, item: str) -> int | None:
        i = self.index.get(item)
        if i is not None and i < self.n:
            return i
        j = self.tail_index.get(item)
        return None if j is None else self.n + j

    def name(self, j: int) -> str:
        return self.prefix[j] if j < self.n else self.tail[j - self.n]

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and self.position(item) is not None

    def __len__(self) -> int:
        return self.n + len(self.tail)


@dataclass(eq=False)
class _Buffer:
    data: torch.Tensor  # (capacity, w) columns; rows [:n] belong to the Scorer that owns it
    gen: int  # the generation whose columns it holds
    owner: weakref.ref | None = None  # the Scorer reading it; dead = free to rewrite


class ColumnStore:
    """Left-right buffers for the candidate columns of one lineage of linear Scorers.

    A Scorer is immutable for its readers, so the next version's columns cannot be written into
    the matrix being served. Three designs were measured (bench numbers in
    docs/architecture.md, "Swapping a version"):

    - copy the whole matrix, then rewrite the changed rows: O(N) per version (a 129-float row per
      item: ~0.5 GB at 1M items, tens to hundreds of ms of memcpy);
    - copy-on-write chunks of rows: a micro-batch touches a few hundred rows spread over the
      whole catalog (popular items are everywhere), so most chunks get copied anyway, and every
      request pays a loop over chunks;
    - left-right (chosen): keep a small pool of full buffers; write generation g+1 into a buffer
      no live Scorer reads, after bringing it up to date with the rows logged since the
      generation it holds (from the newest buffer), then hand it to the new Scorer. Readers
      "drain" when the old Scorer is garbage (a weak reference tells; requests hold the Scorer
      for exactly as long as they run), so no lock sits on the request path. A swap costs
      O(rows changed in the last few generations); memory is two buffers (three while an old
      Scorer is pinned, as the learner's gate reference is), and a buffer too far behind is
      refreshed by one memcpy.

    Only the newest Scorer of a lineage may be `updated`; the builder is one thread.
    """

    def __init__(self, max_buffers: int = 3) -> None:
        self.gen = 0
        self.max_buffers = max_buffers
        self.log: dict[int, torch.Tensor] = {}  # generation -> positions it wrote, (k,)
        self.buffers: list[_Buffer] = []

    def first(self, cols: torch.Tensor) -> _Buffer:
        """A buffer holding `cols` (N, w) as generation 0 of this store."""
        buf = self._alloc(cols.shape[0], cols.shape[1], cols)
        buf.data[: cols.shape[0]] = cols
        self.buffers.append(buf)
        return buf

    def _alloc(self, n: int, width: int, like: torch.Tensor) -> _Buffer:
        cap = int(n * HEADROOM) + 64
        return _Buffer(torch.empty(cap, width, dtype=like.dtype, device=like.device), self.gen)

    def next(self, cur: _Buffer, n_old: int, n: int, rows: torch.Tensor,
             vals: torch.Tensor) -> _Buffer:
        """Generation `gen + 1`: the columns of `cur` (its first `n_old` rows) with rows `rows`
        (k,) set to `vals` (k, w), `n` rows in all (every row from `n_old` on is in `rows`)."""
        assert cur.gen == self.gen and n >= n_old
        self.gen += 1
        self.log[self.gen] = rows
        buf = self._free(cur, n)
        if buf is None:
            buf = self._alloc(n, cur.data.shape[1], cur.data)
            buf.data[:n_old] = cur.data[:n_old]
            if len(self.buffers) >= self.max_buffers:  # forget the stalest; its Scorer keeps it
                self.buffers.remove(min((b for b in self.buffers if b is not cur),
                                        key=lambda b: b.gen))
            self.buffers.append(buf)
        else:
            gens = range(buf.gen + 1, self.gen)
            lost = any(g not in self.log for g in gens)  # further behind than the log reaches
            behind = [self.log[g] for g in gens if g in self.log]
            stale = rows[:0] if lost or not behind else torch.cat(behind).unique()
            if lost or len(stale) > n_old // 2:
                buf.data[:n_old] = cur.data[:n_old]  # one memcpy beats a large gather
            elif len(stale):
                buf.data[stale] = cur.data[stale]
        buf.data[rows] = vals
        buf.gen = self.gen
        oldest = max(min(b.gen for b in self.buffers), self.gen - MAX_LOG)
        for g in [g for g in self.log if g <= oldest]:
            del self.log[g]
        return buf

    def _free(self, cur: _Buffer, n: int) -> _Buffer | None:
        """The least stale pooled buffer that no live Scorer reads and that has room for `n`."""
        free = [b for b in self.buffers if b is not cur and b.data.shape[0] >= n
                and (b.owner is None or b.owner() is None)]
        return max(free, key=lambda b: b.gen) if free else None


class Scorer:
    """An immutable view of a model for ranking: the item matrix is computed once at build time.

    Being immutable is what makes hot swaps atomic: a request takes one Scorer reference and is
    served wholly by it, whatever the server swaps in meanwhile. With a linear item tower the
    next version's Scorer is `updated` from this one at the cost of the rows it changed.

    `ann`, when a server sets it (service/ann.py), proposes candidates for `rank_batch`; they
    are scored exactly with this Scorer's columns and excluded items are removed exactly.
    """

    ann: Any = None  # an object with `candidates(scorer, users, want)`, or None: exact
    changed: torch.Tensor | None = None  # rows rewritten since the Scorer it was `updated` from

    def __init__(self, net: TwoTower, text: torch.Tensor, item_ids: Sequence[str] | ItemNames,
                 base: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 dtype: str = "fp32") -> None:
        """`text` (N, H) features of `item_ids`; with a linear item tower `base` (N, k) may be
        given (the fixed projection, computed once per item) and `text` is then not read, and
        `ids` (N', d) may give the ID rows when `net` carries no ID table (N' <= N: the rest
        are new items, zero). `dtype` is how the item matrix is stored (`model.quant`: fp32,
        fp16, or int8 with a scale per row); scores are accumulated in float32 either way."""
        self.names = item_ids if isinstance(item_ids, ItemNames) else ItemNames.of(item_ids)
        self.net = net
        self.dtype = quant.check(dtype)
        self.history_len = net.cfg.history_len
        self.linear = net.cfg.item_tower == "linear"
        with torch.no_grad():
            n = len(self.names)
            table = net.id_emb if ids is None else ids
            dev = table.device
            # rows past the table: new items; with item_bias the last column is the offset
            rows = torch.zeros(n, net.cfg.dim + int(net.cfg.item_bias), device=dev)
            n_ids = min(n, table.shape[0])
            if net.cfg.id_embedding and n_ids:
                rows[:n_ids] = table[:n_ids]
            if self.linear:
                if net.cfg.text and base is None:
                    base = fixed_projection(net, text)
                cols = linear_columns(rows, base, net.cfg.dim)
                self.width = cols.shape[1]
                self._store = ColumnStore()
                self._adopt(self._store.first(quant.encode(cols, dtype)))
            else:
                e, bias = split_row(rows, net.cfg.dim)
                assert e is not None
                items = torch.nn.functional.normalize(net.text_part(text) + e, dim=-1)
                if bias is not None:  # (N, d + 1): [v | offset], queried by [u | 1]
                    items = torch.cat([items, bias.unsqueeze(-1)], dim=-1)
                self.width = items.shape[1]
                self.items = quant.encode(items, dtype)

    def _adopt(self, buf: _Buffer) -> None:
        buf.owner = weakref.ref(self)
        self._buf = buf
        self.cols = buf.data[: len(self.names)]  # (N, k + 1 + d) stored as `dtype` (model.quant);
        # valid while this Scorer lives

    def updated(self, net: TwoTower, names: ItemNames, rows: torch.Tensor, ids: torch.Tensor,
                base: torch.Tensor | None) -> Scorer:
        """The next version's Scorer (linear item tower): this one's columns with `rows` (k,)
        rebuilt from their ID rows `ids` (k, d) and fixed projections `base` (k, kb) (None for
        an ID-only model). `net` is the new version's dense towers (its ID table is not read);
        `names` may extend this Scorer's, and every position from `len(self)` on must be in
        `rows`. Costs O(k) plus the rows the reused buffer missed (see ColumnStore)."""
        if not self.linear:
            raise ValueError("only a linear item tower can be updated row by row")
        n_old, n = len(self), len(names)
        if n < n_old:
            raise ValueError(f"a catalog of {n_old} items cannot shrink to {n}")
        out = object.__new__(Scorer)
        out.names, out.net, out.linear = names, net, True
        out.history_len, out.dtype, out.width = net.cfg.history_len, self.dtype, self.width
        with torch.no_grad():
            vals = quant.encode(linear_columns(ids, base, net.cfg.dim), self.dtype)  # (k, w)
            if self._buf.gen != self._store.gen:  # not the newest of its lineage: start a new one
                out._store = ColumnStore()
                buf = out._store.first(self.cols)
            else:
                out._store, buf = self._store, self._buf
            out._adopt(out._store.next(buf, n_old, n, rows.to(buf.data.device), vals))
        out.changed = rows
        return out

    def _queries(self, users: torch.Tensor) -> torch.Tensor:
        """(B, d) user vectors -> the queries over the stored item matrix: (B, k + 1 + d) over
        `cols` (linear), the user vectors themselves (mlp); with item_bias one more column of
        ones reads the items' offsets."""
        q = users
        if self.linear and self.net.cfg.text:
            proj = self.net.adapter.proj
            q = torch.cat([users @ proj.weight, (users @ proj.bias).unsqueeze(-1), users], dim=1)
        if self.net.cfg.item_bias:
            q = torch.cat([q, q.new_ones(q.shape[0], 1)], dim=1)
        return q

    def _item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Candidate vectors (..., d) of catalog rows `idx` (...,)."""
        d = self.net.cfg.dim
        if not self.linear:
            return quant.decode(self.items[idx], self.dtype, self.width)[..., :d]
        rows = quant.decode(self.cols[idx], self.dtype, self.width)  # (..., k + 1 + d): s t, s, s e
        if self.net.cfg.item_bias:
            rows = rows[..., :-1]  # the offset column is not part of the vector
        out = rows[..., -d:]
        if self.net.cfg.text:
            out = out + self.net.adapter.proj(rows[..., :-d - 1]) - \
                (1 - rows[..., -d - 1: -d]) * self.net.adapter.proj.bias
        return out

    @property
    def item_ids(self) -> list[str]:
        """Every item id by position (builds a list: O(N))."""
        return self.names.prefix[: self.names.n] + self.names.tail

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, item: object) -> bool:
        return item in self.names

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[Sequence[str]]) -> torch.Tensor:
        """Histories of item ids (oldest first; unknown ids ignored) -> (B, d) query vectors."""
        t = self.history_len
        idx = torch.full((len(histories), t), -1, dtype=torch.long)
        for row, items in enumerate(histories):
            known = [j for j in map(self.names.position, items) if j is not None][-t:]
            if known:
                idx[row, t - len(known):] = torch.tensor(known)
        return self._users_of_rows(idx)

    def _users_of_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) catalog rows of histories, right-aligned, -1 = none -> (B, d) user vectors."""
        idx = idx.to(self.net.id_emb.device)
        mask = idx >= 0
        hist = self.net.history_vectors(self._item_vectors(idx.clamp(min=0)))
        hist = hist * mask.unsqueeze(-1)  # (B, T, d)
        return self.net.user_vectors(hist, mask)

    def scores(self, users: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d) user vectors -> (B, N) scores over the whole catalog, or (B, R) over the
        catalog rows `rows` (R,)."""
        matrix = self.cols if self.linear else self.items
        if rows is not None:
            matrix = matrix[rows.to(matrix.device)]
        return quant.scores(self._queries(users), matrix, self.dtype) / self.net.cfg.temperature

    def matrix_bytes(self) -> int:
        """Bytes of the item matrix this Scorer reads (one side of the left-right pool)."""
        return quant.nbytes(self.cols if self.linear else self.items)

    @torch.no_grad()
    def hits(self, history_rows: torch.Tensor, exclude: tuple[torch.Tensor, torch.Tensor],
             targets: torch.Tensor, k: int, among: torch.Tensor | None = None) -> torch.Tensor:
        """1.0 where the target ranks in the top k, as `rank_batch` would rank it, in catalog
        rows throughout: histories (B, T) right-aligned with -1 for none, excluded cells as
        (row, column) index tensors, targets (B,). No sort and no per-row Python: the
        validation gate calls it at every publish. `among` (S,) distinct catalog rows: rank
        each target among those rows only (a sampled ranking, O(S) not O(N) per target)."""
        users = self._users_of_rows(history_rows)
        if among is None:
            scores = self.scores(users)
            dev = scores.device
            scores[exclude[0].to(dev), exclude[1].to(dev)] = float("-inf")
            target = scores.gather(1, targets.to(dev).unsqueeze(1))
        else:
            dev = users.device
            among = among.to(dev).sort().values
            targets, rows, cols = targets.to(dev), exclude[0].to(dev), exclude[1].to(dev)
            scores = self.scores(users, torch.cat([targets, among]))  # (B, B + S)
            b = len(targets)
            target = scores[torch.arange(b, device=dev), torch.arange(b, device=dev)]
            target = target.unsqueeze(1)  # (B, 1) each row's own target
            scores = scores[:, b:]  # (B, S) the sample
            rows = torch.cat([torch.arange(b, device=dev), rows])  # not itself, not excluded
            cols = torch.cat([targets, cols])
            at = torch.searchsorted(among, cols).clamp(max=max(len(among) - 1, 0))
            inside = among[at] == cols if len(among) else torch.zeros_like(cols, dtype=bool)
            scores[rows[inside], at[inside]] = float("-inf")
            rows, cols = rows[b:], cols[b:]
            target[rows[cols == targets[rows]], 0] = float("-inf")  # an excluded target
        ahead = (scores > target).sum(dim=1)
        return ((ahead < k) & torch.isfinite(target.squeeze(1))).float().cpu()

    @torch.no_grad()
    def rank_batch(self, histories: Sequence[Sequence[str]], k: int,
                   exclude: Sequence[Collection[str]] = ()) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per history over the whole catalog, minus excluded ids."""
        if not histories or not len(self):
            return [[] for _ in histories]
        users = self.user_vectors(histories)  # (B, d)
        excluded = [[j for j in map(self.names.position, ex) if j is not None]
                    for ex in exclude]
        name = self.names.name
        temp = self.net.cfg.temperature
        out: list[list[tuple[str, float]] | None] = [None] * len(histories)
        if self.ann is not None:  # candidates, scored exactly; exclusion exact; else fall back
            most = max((len(ex) for ex in excluded), default=0)
            for row, (cand, vals) in enumerate(self.ann.candidates(self, users, k + most)):
                drop = set(excluded[row]) if row < len(excluded) else set()
                scaled = (torch.tensor(vals, dtype=torch.float32) / temp).tolist()  # as below
                kept = [(name(j), v) for j, v in zip(cand, scaled, strict=True)
                        if j not in drop][:k]
                if len(kept) >= min(k, len(self) - len(drop)):
                    out[row] = kept
                else:
                    self.ann.fallbacks += 1
        todo = [row for row, got in enumerate(out) if got is None]
        if todo:
            scores = self.scores(users[todo])  # (b, N)
            for i, row in enumerate(todo):
                if row < len(excluded) and excluded[row]:
                    scores[i, excluded[row]] = float("-inf")
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            for row, vals, ids in zip(todo, top.values.tolist(), top.indices.tolist(),
                                      strict=True):
                out[row] = [(name(j), float(v)) for v, j in zip(vals, ids, strict=True)
                            if v != float("-inf")]
        return [got or [] for got in out]


def linear_columns(ids: torch.Tensor, base: torch.Tensor | None, d: int | None = None
                   ) -> torch.Tensor:
    """Candidate columns [s t | s | s e] (N, k + 1 + d) of items with ID rows `ids` (N, d) and
    fixed projections `base` (N, k), s = id_scale(e): a query [W^T u | u . b | u] scores
    s (W t + b + e) . u, so the adapter W, b never touches them. ID rows (N, d + 1) carry an
    offset o (item_bias; pass `d`): the columns end with it, read by a trailing 1 in the query.
    Row by row: a subset of rows gets the same bits as the whole (what lets `Scorer.updated`
    equal a full build)."""
    e, bias = split_row(ids, ids.shape[1] if d is None else d)
    assert e is not None
    scale = id_scale(e)  # (N, 1)
    cols = scale * e if base is None else torch.cat([scale * base, scale, scale * e], dim=1)
    return cols if bias is None else torch.cat([cols, bias.unsqueeze(-1)], dim=1)


def fixed_projection(net: TwoTower, text: torch.Tensor) -> torch.Tensor:
    """The linear tower's per-item part t = unit(text @ basis), (N, H) -> (N, k), with the same
    bits whether an item is projected alone, in a batch or with the whole catalog: the CPU's
    GEMM rounds 1-3-row products differently, so short batches are padded with zero rows."""
    n = text.shape[0]
    if n >= MIN_ROWS:
        return net.adapter.base(text)
    padded = torch.cat([text, text.new_zeros(MIN_ROWS - n, text.shape[1])])
    return net.adapter.base(padded)[:n]
