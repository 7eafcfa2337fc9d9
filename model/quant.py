"""How the served item matrix is stored: fp32, fp16, or int8 with one scale per row (issue 8).

A stored matrix is one tensor, so the left-right buffers of `model.scorer.ColumnStore` hold any
of the three unchanged and a row is rewritten in place like any other:

- fp32: the rows themselves (N, w);
- fp16: the rows rounded to half precision (N, w): half the memory;
- int8: (N, w8 + 4) int8, w8 = w rounded up to a multiple of 4: the codes round(x / s) with
  s = max|x| / 127 per row, then s itself as the 4 bytes of a float32 (read back with a dtype
  view, so the scale travels with its row and a row update stays one write): about a quarter.

Scores are always accumulated in float32: a stored block is widened to float32 a chunk of
rows at a time (cache sized) and multiplied there, so compression costs memory bandwidth, not
accuracy of the accumulation. The error against fp32 is the rounding of the stored rows: per
score at most |q|_1 * max|x| * 2^-11 for fp16 and |q|_1 * s / 2 for int8 (s the row's scale).
"""

from __future__ import annotations

import torch

DTYPES = ("fp32", "fp16", "int8")
CHUNK = 8192  # rows widened to float32 per matmul: ~4 MB at w = 129, stays in cache


def check(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"item dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def encode(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """(N, w) float rows -> their stored form (see the module docstring)."""
    if dtype == "fp32":
        return x.to(torch.float32)
    if dtype == "fp16":
        return x.to(torch.float16)
    n, w = x.shape
    w8 = -(-w // 4) * 4
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127  # (N, 1)
    out = torch.zeros(n, w8 + 4, dtype=torch.int8, device=x.device)
    out[:, :w] = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    out[:, w8:].view(torch.float32)[:] = scale.to(torch.float32)
    return out


def width(stored: torch.Tensor, dtype: str, w: int) -> int:
    """Columns of the stored form of a (N, w) matrix."""
    return w if dtype != "int8" else -(-w // 4) * 4 + 4


def decode(stored: torch.Tensor, dtype: str, w: int) -> torch.Tensor:
    """Stored rows (..., ws) -> float32 rows (..., w)."""
    if dtype != "int8":
        return stored.to(torch.float32)
    w8 = stored.shape[-1] - 4
    scale = stored[..., w8:].contiguous().view(torch.float32)  # (..., 1)
    return stored[..., :w].to(torch.float32) * scale


def scores(queries: torch.Tensor, stored: torch.Tensor, dtype: str) -> torch.Tensor:
    """(B, w) float32 queries against stored rows (N, ws) -> (B, N) float32 scores."""
    if dtype == "fp32":
        return queries @ stored.T
    n, w = stored.shape[0], queries.shape[1]
    out = queries.new_empty(queries.shape[0], n)
    for start in range(0, n, CHUNK):
        block = stored[start: start + CHUNK]
        if dtype == "fp16":
            out[:, start: start + len(block)] = queries @ block.to(torch.float32).T
        else:
            w8 = block.shape[1] - 4
            scale = block[:, w8:].contiguous().view(torch.float32)  # (c, 1)
            out[:, start: start + len(block)] = \
                (queries @ block[:, :w].to(torch.float32).T) * scale.T
    return out


def nbytes(stored: torch.Tensor) -> int:
    return stored.numel() * stored.element_size()
