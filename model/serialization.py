"""Weights as bytes: safetensors only (no pickle), full snapshots and row deltas, verification.

Pure functions over `dict[str, Tensor]`; the Redis weight store (store/weights.py) moves the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

ID_TABLE = "id_emb"


class WeightsError(ValueError):
    """A blob that must not be served: bad shape, non-finite values, unreadable."""


def to_bytes(tensors: dict[str, torch.Tensor], item_ids: Sequence[str]) -> bytes:
    """A safetensors blob; the ID table's row names ride in its string metadata."""
    cpu = {k: v.detach().to("cpu", torch.float32).contiguous() if v.is_floating_point()
           else v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(cpu, metadata={"item_ids": json.dumps(list(item_ids))})


def from_bytes(blob: bytes) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Parse a safetensors blob (never pickle). Raises WeightsError when unreadable."""
    from safetensors import safe_open  # noqa: F401 - import check for a clear error below

    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8: 8 + header_len]).get("__metadata__", {})
        item_ids = json.loads(meta.get("item_ids", "[]"))
    except Exception as exc:  # safetensors raises several types for garbage input
        raise WeightsError(f"unreadable weights blob: {exc}") from exc
    return tensors, [str(i) for i in item_ids]


def make_delta(parent: dict[str, torch.Tensor], parent_ids: Sequence[str],
               child: dict[str, torch.Tensor], child_ids: Sequence[str]
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What changed from parent to child: dense tensors whole, only the changed ID-table rows.

    The item vocabulary is append-only, so the child's ids extend the parent's.
    """
    if list(child_ids[: len(parent_ids)]) != list(parent_ids):
        raise WeightsError("item vocabulary is not an extension of the parent's")
    delta = {k: v for k, v in child.items() if k != ID_TABLE and not torch.equal(v, parent[k])}
    old, new = parent[ID_TABLE], child[ID_TABLE]
    changed = (new[: old.shape[0]] != old).any(dim=1).nonzero().flatten()
    rows = torch.cat([changed, torch.arange(old.shape[0], new.shape[0])])
    delta["id_emb.rows"] = rows.to(torch.int64)
    delta["id_emb.values"] = new[rows]
    delta["id_emb.size"] = torch.tensor([new.shape[0]], dtype=torch.int64)
    return delta, list(child_ids[len(parent_ids):])


def apply_delta(base: dict[str, torch.Tensor], base_ids: Sequence[str],
                delta: dict[str, torch.Tensor], added_ids: Sequence[str]
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Inverse of make_delta. Returns new tensors; `base` is not modified."""
    out = dict(base)
    for k, v in delta.items():
        if not k.startswith("id_emb."):
            if k not in base or base[k].shape != v.shape:
                raise WeightsError(f"delta tensor {k} does not match the base")
            out[k] = v
    size = int(delta["id_emb.size"][0])
    old = base[ID_TABLE]
    table = torch.zeros(size, old.shape[1], dtype=old.dtype)
    table[: old.shape[0]] = old
    rows = delta["id_emb.rows"]
    if rows.numel() and (int(rows.max()) >= size or int(rows.min()) < 0):
        raise WeightsError("delta rows out of range")
    table[rows] = delta["id_emb.values"]
    out[ID_TABLE] = table
    ids = list(base_ids) + list(added_ids)
    if len(ids) != size:
        raise WeightsError(f"delta names {len(ids)} items for a table of {size} rows")
    return out, ids


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                  n_items: int, table_rows: torch.Tensor | None = None) -> None:
    """Shapes must match the architecture and every value must be finite. `table_rows` (k,)
    limits the ID table's finiteness check to those rows (the others were checked in the
    version this one was built from by a delta), so checking a delta costs what it changed."""
    for name, shape in expected.items():
        if name == ID_TABLE:
            continue
        if name not in tensors:
            raise WeightsError(f"missing tensor {name}")
        if tensors[name].shape != shape:
            raise WeightsError(f"tensor {name} has shape {tuple(tensors[name].shape)}, "
                               f"expected {tuple(shape)}")
    extra = set(tensors) - set(expected)
    if extra:
        raise WeightsError(f"unexpected tensors {sorted(extra)[:5]}")
    table = tensors.get(ID_TABLE)
    if table is None or table.shape[0] != n_items or table.shape[1] != expected[ID_TABLE][1]:
        raise WeightsError("item-ID table does not match the item list")
    for name, t in tensors.items():
        if name == ID_TABLE and table_rows is not None:
            t = t[table_rows[table_rows < len(t)]]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise WeightsError(f"tensor {name} has non-finite values")
