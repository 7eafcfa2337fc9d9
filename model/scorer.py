"""Ranking with a frozen snapshot of the towers: the one path used by the learner and the server."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from model.towers import TwoTower, id_scale


class Scorer:
    """An immutable view of a model for ranking: the item matrix is computed once at build time.

    Being immutable is what makes hot swaps atomic: a request takes one Scorer reference and is
    served wholly by it, whatever the server swaps in meanwhile.
    """

    def __init__(self, net: TwoTower, text: torch.Tensor, item_ids: Sequence[str],
                 base: torch.Tensor | None = None) -> None:
        """`text` (N, H) features of `item_ids`; with a linear item tower `base` (N, k) may be
        given (the fixed projection, computed once per item) and `text` is then not read."""
        self.item_ids = list(item_ids)
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.net = net
        self.history_len = net.cfg.history_len
        self.linear = net.cfg.item_tower == "linear"
        with torch.no_grad():
            n, n_ids = len(self.item_ids), net.id_emb.shape[0]
            dev = net.id_emb.device
            ids = torch.zeros(n, net.cfg.dim, device=dev)  # rows past the table: new items
            if net.cfg.id_embedding and n_ids:
                ids[: min(n, n_ids)] = net.id_emb[: min(n, n_ids)]
            if self.linear:
                self._build_linear(text, ids, base)
            else:
                self.items = torch.nn.functional.normalize(net.text_part(text) + ids, dim=-1)

    def _build_linear(self, text: torch.Tensor, ids: torch.Tensor,
                      base: torch.Tensor | None) -> None:
        """Candidate columns [s t | s | s e] (N, k + 1 + d), s = id_scale(e): a query
        [W^T u | u . b | u] scores s (W t + b + e) . u, so the adapter W, b never touches them."""
        scale = id_scale(ids)  # (N, 1)
        parts = [scale * ids]
        if self.net.cfg.text:
            if base is None:
                base = self.net.adapter.base(text)
            parts = [scale * base, scale, *parts]
        self.cols = torch.cat(parts, dim=1)

    def _queries(self, users: torch.Tensor) -> torch.Tensor:
        """(B, d) user vectors -> (B, k + 1 + d) queries over `cols`."""
        if not self.net.cfg.text:
            return users
        proj = self.net.adapter.proj
        return torch.cat([users @ proj.weight, (users @ proj.bias).unsqueeze(-1), users], dim=1)

    def _item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Candidate vectors (..., d) of catalog rows `idx` (...,)."""
        if not self.linear:
            return self.items[idx]
        d = self.net.cfg.dim
        rows = self.cols[idx]  # (..., k + 1 + d): s t, s, s e
        out = rows[..., -d:]
        if self.net.cfg.text:
            out = out + self.net.adapter.proj(rows[..., :-d - 1]) - \
                (1 - rows[..., -d - 1: -d]) * self.net.adapter.proj.bias
        return out

    def __len__(self) -> int:
        return len(self.item_ids)

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[Sequence[str]]) -> torch.Tensor:
        """Histories of item ids (oldest first; unknown ids ignored) -> (B, d) query vectors."""
        t = self.history_len
        idx = torch.full((len(histories), t), -1, dtype=torch.long)
        for row, hist in enumerate(histories):
            known = [self.index[i] for i in hist if i in self.index][-t:]
            if known:
                idx[row, t - len(known):] = torch.tensor(known)
        idx = idx.to(self.net.id_emb.device)
        mask = idx >= 0
        hist = self.net.history_vectors(self._item_vectors(idx.clamp(min=0)))
        hist = hist * mask.unsqueeze(-1)  # (B, T, d)
        return self.net.user_vectors(hist, mask)

    @torch.no_grad()
    def rank_batch(self, histories: Sequence[Sequence[str]], k: int,
                   exclude: Sequence[Collection[str]] = ()) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per history over the whole catalog, minus excluded ids."""
        if not histories or not self.item_ids:
            return [[] for _ in histories]
        users = self.user_vectors(histories)  # (B, d)
        if self.linear:
            scores = self._queries(users) @ self.cols.T / self.net.cfg.temperature  # (B, N)
        else:
            scores = users @ self.items.T / self.net.cfg.temperature  # (B, N)
        for row, ex in enumerate(exclude):
            cols = [self.index[i] for i in ex if i in self.index]
            if cols:
                scores[row, cols] = float("-inf")
        k = min(k, scores.shape[1])
        top = scores.topk(k, dim=1)
        out = []
        for vals, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            out.append([(self.item_ids[j], float(v)) for v, j in zip(vals, ids, strict=True)
                        if v != float("-inf")])
        return out
