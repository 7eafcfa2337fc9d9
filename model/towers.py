"""The two towers. Items: adapter(text features) + item-ID embedding. Users: attention over the
recent items' vectors. Score: cosine / temperature. Modules here only compute."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.config import ModelConfig


class ItemAdapter(nn.Module):
    """Maps frozen text features (H) to the shared space (dim): a linear map plus a residual MLP."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, text: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, dim)
        h = self.proj(text)
        return h + self.mlp(h)


class UserTower(nn.Module):
    """Reads the user's last T item vectors (oldest first, left-padded) into one query vector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, t = cfg.dim, cfg.history_len
        self.pos = nn.Parameter(torch.zeros(t, d))  # learned recency embedding, newest at t-1
        self.empty = nn.Parameter(torch.zeros(d))  # query of a user with no history (cold start)
        nn.init.normal_(self.empty, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, cfg.user_heads, 2 * d, dropout=0.0, batch_first=True,
                                       norm_first=True)
            for _ in range(cfg.user_layers)
        )
        self.recency = nn.Parameter(torch.linspace(-1.0, 0.0, t))  # pooling logits per position
        self.out = nn.Linear(2 * d, d)

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist (B, T, d) item vectors, mask (B, T) True where an item is present -> (B, d)."""
        x = hist + self.pos  # (B, T, d)
        any_item = mask.any(dim=1)  # (B,)
        safe_mask = mask.clone()
        safe_mask[~any_item, -1] = True  # a fully padded row would make attention NaN
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~safe_mask)
        w = self.recency.masked_fill(~safe_mask, float("-inf")).softmax(dim=1)  # (B, T)
        pooled = (w.unsqueeze(-1) * x).sum(1)  # (B, d)
        last = x[:, -1]  # newest item, the strongest single signal for "what next"
        q = self.out(torch.cat([pooled, last], dim=-1)) + pooled
        return torch.where(any_item.unsqueeze(-1), q, self.empty.expand_as(q))


class TwoTower(nn.Module):
    """All trainable parameters outside the text encoder. The item-ID table grows with the catalog."""

    def __init__(self, cfg: ModelConfig, text_dim: int, n_items: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.adapter = ItemAdapter(text_dim, cfg.dim)
        self.user = UserTower(cfg)
        self.id_emb = nn.Parameter(torch.zeros(n_items, cfg.dim))  # zero: new items = text only

    def text_part(self, text: torch.Tensor) -> torch.Tensor:
        """text (N, H) -> (N, d): what the text contributes; nothing in an ID-only model."""
        if self.cfg.text:
            return self.adapter(text)
        return text.new_zeros(text.shape[0], self.cfg.dim)

    def item_vectors(self, text: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """text (N, H) features of items `idx` (N,) -> unit vectors (N, d). Sparse grads on IDs."""
        v = self.text_part(text)
        if self.cfg.id_embedding and idx is not None:
            v = v + F.embedding(idx, self.id_emb, sparse=True)
        return F.normalize(v, dim=-1)

    def user_vectors(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist (B, T, d), mask (B, T) -> unit vectors (B, d)."""
        return F.normalize(self.user(hist, mask), dim=-1)

    def grow(self, n_items: int) -> None:
        """Extend the ID table to `n_items` rows. New rows start at zero (a new item is its text)
        or, in an ID-only model, small and random: a zero vector has no direction to rank by."""
        old = self.id_emb.data
        if n_items <= old.shape[0]:
            return
        new = torch.zeros(n_items, old.shape[1], dtype=old.dtype, device=old.device)
        if not self.cfg.text:  # seeded by position, so runs stay deterministic
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + old.shape[0])
            rows = torch.randn(n_items - old.shape[0], old.shape[1], generator=gen) * 0.1
            new[old.shape[0]:] = rows.to(dtype=old.dtype, device=old.device)
        new[: old.shape[0]] = old
        self.id_emb = nn.Parameter(new)
