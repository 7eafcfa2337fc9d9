"""Ranking with a frozen snapshot of the towers: the one path used by the learner and the server."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from model.towers import TwoTower


class Scorer:
    """An immutable view of a model for ranking: the item matrix is computed once at build time.

    Being immutable is what makes hot swaps atomic: a request takes one Scorer reference and is
    served wholly by it, whatever the server swaps in meanwhile.
    """

    def __init__(self, net: TwoTower, text: torch.Tensor, item_ids: Sequence[str]) -> None:
        self.item_ids = list(item_ids)
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.net = net
        self.history_len = net.cfg.history_len
        with torch.no_grad():
            n_ids = net.id_emb.shape[0]
            idx = torch.arange(len(self.item_ids), device=text.device).clamp(max=max(n_ids - 1, 0))
            vecs = net.text_part(text)
            if net.cfg.id_embedding and n_ids:
                known = torch.arange(len(self.item_ids), device=text.device) < n_ids
                vecs = vecs + net.id_emb[idx] * known.unsqueeze(-1)
            self.items = torch.nn.functional.normalize(vecs, dim=-1)  # (N, d)

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
        idx = idx.to(self.items.device)
        mask = idx >= 0
        hist = self.items[idx.clamp(min=0)] * mask.unsqueeze(-1)  # (B, T, d)
        return self.net.user_vectors(hist, mask)

    @torch.no_grad()
    def rank_batch(self, histories: Sequence[Sequence[str]], k: int,
                   exclude: Sequence[Collection[str]] = ()) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per history over the whole catalog, minus excluded ids."""
        if not histories or not self.item_ids:
            return [[] for _ in histories]
        scores = self.user_vectors(histories) @ self.items.T / self.net.cfg.temperature  # (B, N)
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
