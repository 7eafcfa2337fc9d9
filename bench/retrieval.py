"""Top-10 retrieval over the served item matrix: fp32 / fp16 / int8 storage and the ANN index.

    python -m bench.retrieval --items 100000 --items 1000000 --out bench/out

Synthetic linear-tower columns of width 129 ([s t | s | s e], t unit text projections, e ID
rows), either i.i.d. random text (`--text random`, what `bench serving` seeds) or clustered by
topic (`--text topics`, closer to real text embeddings). One torch thread, one query at a time
(what one API request does). Per size and storage: bytes per item, median / p99 ms per query,
recall@10 against fp32 exact. Then the faiss IVF index (service/ann.py) tuned to recall 0.97:
build time, nprobe, ms per query, recall@10 and the cost of writing 272 changed rows.
Writes retrieval.json under --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from model import quant


def columns(n: int, text: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if text == "topics":
        topics = torch.randn(2000, 64, generator=gen)
        t = topics[torch.randint(2000, (n,), generator=gen)] + 0.35 * torch.randn(n, 64,
                                                                                  generator=gen)
    else:
        t = torch.randn(n, 64, generator=gen)
    t = torch.nn.functional.normalize(t, dim=1)
    e = torch.randn(n, 64, generator=gen) * 0.1
    s = torch.rsqrt(1 + (e ** 2).sum(1, keepdim=True))
    return torch.cat([s * t, s, s * e], dim=1)


def queries(b: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, 64, generator=gen)
    w = torch.randn(64, 64, generator=gen) / 8
    return torch.cat([u @ w, (u @ torch.randn(64, generator=gen) * 0.1)[:, None], u], dim=1)


def timed(fn, times: int) -> tuple[float, float]:  # noqa: ANN001
    out = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    out.sort()
    return statistics.median(out), out[min(len(out) - 1, int(0.99 * len(out)))]


def measure(n: int, text: str, n_queries: int, ann: bool) -> dict:
    x = columns(n, text)
    q = queries(n_queries)
    exact = (q @ x.T).topk(10).indices
    res: dict = {"items": n, "text": text, "storage": {}}
    for dtype in quant.DTYPES:
        stored = quant.encode(x, dtype)
        got = torch.cat([quant.scores(q[i: i + 1], stored, dtype).topk(10).indices
                         for i in range(n_queries)])
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, got,
                                                                          strict=True))
        p50, p99 = timed(lambda s=stored, d=dtype: quant.scores(q[:1], s, d).topk(10),
                         max(10, n_queries // 4))
        res["storage"][dtype] = {"bytes_per_item": quant.nbytes(stored) / n, "ms_p50": p50,
                                 "ms_p99": p99, "recall@10": hits / (10 * n_queries),
                                 "matrix_mb": quant.nbytes(stored) / 2**20}
        del stored
    if ann:
        res["ann"] = measure_ann(x, q, exact)
    return res


def measure_ann(x: torch.Tensor, q: torch.Tensor, exact: torch.Tensor) -> dict:
    """The IVF index of service/ann.py over the fp32 rows, through a stand-in Scorer."""
    import numpy as np

    from service.ann import AnnIndex

    class Rows:  # what AnnIndex reads of a Scorer
        linear, dtype, width = True, "fp32", x.shape[1]
        cols = x

        def __len__(self) -> int:
            return len(x)

        def _queries(self, users: torch.Tensor) -> torch.Tensor:
            return users

        def scores(self, users: torch.Tensor) -> torch.Tensor:
            return users @ x.T

    rows = Rows()
    index = AnnIndex(target_recall=0.97)
    t0 = time.perf_counter()
    index.build(rows)  # type: ignore[arg-type]
    build_s = time.perf_counter() - t0
    half = len(q) // 2
    index.tune(rows, q[:half])  # type: ignore[arg-type]
    got = index.candidates(rows, q[half:], 10)  # type: ignore[arg-type]
    hits = sum(len(set(g[:10]) & set(e.tolist())) for (g, _), e in zip(got, exact[half:],
                                                                         strict=True))
    p50, p99 = timed(lambda: index.candidates(rows, q[:1], 10), 40)  # type: ignore[arg-type]
    changed = torch.from_numpy(np.random.default_rng(0).choice(len(x), 272, replace=False))
    upd, _ = timed(lambda: index.update(rows, changed), 5)  # type: ignore[arg-type]
    return {"nlist": index.nlist, "nprobe": index.nprobe, "build_s": build_s,
            "recall@10": hits / (10 * (len(q) - half)), "ms_p50": p50, "ms_p99": p99,
            "update_272_rows_ms": upd}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, action="append")
    ap.add_argument("--text", action="append", choices=["random", "topics"])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--no-ann", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        import faiss  # noqa: F401
        has_faiss = not args.no_ann
    except ImportError:
        has_faiss = False
    runs = [measure(n, text, args.queries, has_faiss) for n in (args.items or [100_000])
            for text in (args.text or ["random"])]
    for r in runs:
        print(f"\n{r['items']:,} items, {r['text']} text")  # noqa: T201
        for dtype, m in r["storage"].items():
            print(f"  {dtype:5} {m['bytes_per_item']:6.0f} B/item {m['matrix_mb']:8.1f} MB "  # noqa: T201
                  f"p50 {m['ms_p50']:7.2f} ms p99 {m['ms_p99']:7.2f} ms "
                  f"recall@10 {m['recall@10']:.3f}")
        if "ann" in r:
            a = r["ann"]
            print(f"  ann   nlist {a['nlist']} nprobe {a['nprobe']} build {a['build_s']:.1f} s "  # noqa: T201
                  f"p50 {a['ms_p50']:.2f} ms p99 {a['ms_p99']:.2f} ms recall@10 "
                  f"{a['recall@10']:.3f}; 272 rows updated in {a['update_272_rows_ms']:.1f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrieval.json").write_text(json.dumps({"runs": runs}, indent=1))


if __name__ == "__main__":
    main()
