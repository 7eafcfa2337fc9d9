"""What one version swap costs the ranking view, by catalog size (linear item tower, issue 8).

    python -m bench.swap --items 2000 --items 200000 --items 1000000 --out bench/out

Synthetic catalog (text features 384-d like MiniLM's, random ID rows), one torch thread. Each
swap touches `--rows` random ID rows and appends 16 items, and the Scorer it replaces is dropped
(as the server drops the snapshot it replaced). Medians over `--swaps` swaps of:

- `rebuild`: what every version cost before: a full `Scorer` from the texts (the projection of
  all N rows, the scales, the names);
- `copy`: copy the served columns whole, then rewrite the changed rows (the plain copy-on-write
  alternative);
- `updated`: `Scorer.updated` over the left-right buffers (what the learner and server do now);
- `copy_delta`: applying a version's delta to the ID table by copying the table
  (`model.serialization.apply_delta`, what the weight store did before), for scale;
- `store_delta`: the weight store's delta application now (`protocol.weights.materialise`:
  the changed rows written into the inactive side of a left-right ID-table pool, names
  shared), without the Redis round trips (those cost the same at every size).

Prints a table and writes `swap.json` (and `swap.png` when matplotlib is present) under `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.config import ModelConfig
from model.scorer import ItemNames, Scorer, fixed_projection
from model.serialization import apply_delta
from model.towers import TwoTower
from protocol.weights import Manifest, materialise

H = 384


def median_ms(fn: Callable[[], object], times: int) -> float:
    out = []
    for _ in range(times):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def measure(n: int, rows: int, swaps: int) -> dict[str, float]:
    """Median milliseconds per swap of each way, over a catalog of n items."""
    gen = torch.Generator().manual_seed(n)
    net = TwoTower(ModelConfig(item_tower="linear"), H, 0).eval()
    extra = 16 * (swaps + 2)
    text = torch.randn(n + extra, H, generator=gen)
    table = torch.randn(n + extra, net.cfg.dim, generator=gen) * 0.3
    ids = [f"i{j}" for j in range(n + extra)]
    index = {item: j for j, item in enumerate(ids)}
    out: dict[str, float] = {"items": float(n)}
    with torch.no_grad():
        out["rebuild_ms"] = median_ms(lambda: Scorer(net, text[:n], ids[:n], ids=table[:n]),
                                      min(swaps, 3))
        served = Scorer(net, text[:n], ItemNames(ids, index, n), ids=table[:n])
        size = n

        def change() -> tuple[int, int, torch.Tensor]:
            n_old = size
            touched = torch.randint(n_old, (rows,), generator=gen)
            return n_old, n_old + 16, torch.cat([touched, torch.arange(n_old, n_old + 16)]).unique()

        def copy_swap() -> None:
            n_old, n_new, r = change()
            cols = torch.empty(n_new, served.cols.shape[1])
            cols[:n_old] = served.cols
            base = fixed_projection(net, text[r])
            scale = torch.rsqrt(1 + (table[r] ** 2).sum(-1, keepdim=True))
            cols[r] = torch.cat([scale * base, scale, scale * table[r]], dim=1)

        def updated_swap() -> None:
            nonlocal served, size
            _, size, r = change()
            served = served.updated(net, ItemNames(ids, index, size), r, table[r],
                                    fixed_projection(net, text[r]))  # the old one is dropped

        out["copy_ms"] = median_ms(copy_swap, swaps)
        updated_swap()  # the first swap allocates the second buffer
        out["updated_ms"] = median_ms(updated_swap, swaps)
        base_state = {"id_emb": table[:n]}
        r = torch.randint(n, (rows,), generator=gen)
        delta = {"id_emb.rows": r, "id_emb.values": table[r],
                 "id_emb.size": torch.tensor([n])}
        names = ids[:n]
        out["copy_delta_ms"] = median_ms(lambda: apply_delta(base_state, names, delta, []),
                                         swaps)
        manifest = Manifest(0, None, "delta", {}, "", "", 0, 1, 0.0)
        have = materialise(manifest, None, [(dict(base_state), list(names))])
        size = n

        def store_swap() -> None:
            nonlocal have, size
            r = torch.cat([torch.randint(size, (rows,), generator=gen),
                           torch.arange(size, size + 16)])
            part = {"id_emb.rows": r, "id_emb.values": table[r],
                    "id_emb.size": torch.tensor([size + 16])}
            have = materialise(manifest, have, [(part, ids[size: size + 16])])
            size += 16

        store_swap()  # the first allocates the second buffer
        out["store_delta_ms"] = median_ms(store_swap, swaps)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, action="append")
    ap.add_argument("--rows", type=int, default=256, help="ID rows a version touches")
    ap.add_argument("--swaps", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = [measure(n, args.rows, args.swaps) for n in (args.items or [2000, 200_000])]
    cols = ("items", "rebuild_ms", "copy_ms", "updated_ms", "copy_delta_ms", "store_delta_ms")
    print(" | ".join(f"{c:>14}" for c in cols))  # noqa: T201 - a benchmark prints its table
    for run in runs:
        print(" | ".join(f"{run[c]:>14.2f}" if c != "items" else f"{int(run[c]):>14}"  # noqa: T201
                         for c in cols))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swap.json").write_text(json.dumps({"rows": args.rows, "runs": runs}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in cols[1:]:
        ax.plot([r["items"] for r in runs], [r[c] for r in runs], marker="o", label=c[:-3])
    ax.set(xscale="log", yscale="log", xlabel="catalog items", ylabel="ms per swap (median)",
           title=f"linear item tower: one swap, {args.rows} ID rows changed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "swap.png", dpi=120)


if __name__ == "__main__":
    main()
