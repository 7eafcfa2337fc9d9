"""Top-10 retrieval over the served item matrix: exact scans (fp32 / fp16 / int8, torch and
faiss, one query or a batch) against ANN indexes (faiss IVF with an nprobe sweep, faiss HNSW,
hnswlib HNSW), on the linear tower's item-vector layout.

    python -m bench.retrieval --items 100000 --items 1000000 --text random --text topics \
        --out bench/out

Columns of width 129, `[s t | s | s e]` (t the fixed unit text projection, e the ID row,
s = 1/sqrt(1 + |e|^2): what `service/linear.py` serves), queries `[W^T u | u . b | u]`. Text is
i.i.d. random (`--text random`, what `bench serving` seeds: no structure for an index to use)
or clustered around 2,000 topics (`--text topics`, closer to real text embeddings). One thread,
one query at a time unless a batch is named. Per method: median / p99 ms per query, recall@10
against fp32 exact, build seconds, memory, and for the indexes the cost of rewriting 272 changed
rows and of appending 1,000 new items in place. Writes retrieval.json under --out, prints tables.

faiss comes with the `ann` extra; hnswlib is compared when installed (`pip install hnswlib`: it
builds from source, so it is in no extra, and the server does not use it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import quant

CHANGED, APPENDED = 272, 1000  # a micro-batch's touched ID rows; a burst of new catalog items


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


def timed(fn: Callable[[int], Any], times: int) -> tuple[float, float]:
    """Median and p99 ms of `fn(i)` over `times` calls (i = 0, 1, ...)."""
    out = []
    for i in range(times):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    out.sort()
    return statistics.median(out), out[min(len(out) - 1, int(0.99 * len(out)))]


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(g[:10].tolist()) & set(e.tolist())) / 10
                          for g, e in zip(got, exact, strict=True)]))


def measure(n: int, text: str, n_queries: int, methods: set[str], reps: int,
            sweep: dict[str, list[int]]) -> dict:
    x = columns(n, text)
    q = queries(n_queries)
    xn, qn = np.ascontiguousarray(x.numpy()), np.ascontiguousarray(q.numpy())
    exact = (q @ x.T).topk(10).indices.numpy()
    res: dict = {"items": n, "text": text, "width": x.shape[1], "storage": {}, "batched": {},
                 "indexes": {}}
    for dtype in quant.DTYPES:  # torch exact scans, as `Scorer.scores` does them
        stored = quant.encode(x, dtype)
        got = torch.cat([quant.scores(q[i: i + 1], stored, dtype).topk(10).indices
                         for i in range(n_queries)]).numpy()
        def scan(i: int, s: torch.Tensor = stored, d: str = dtype) -> object:
            return quant.scores(q[i % n_queries][None], s, d).topk(10)

        p50, p99 = timed(scan, reps)
        res["storage"][dtype] = {"bytes_per_item": quant.nbytes(stored) / n, "ms_p50": p50,
                                 "ms_p99": p99, "recall@10": recall(got, exact),
                                 "matrix_mb": quant.nbytes(stored) / 2**20}
        del stored
    for b in (1, 4, 16, 64):  # one GEMM for b queued requests: ms per batch and per query
        def batch(i: int, b: int = b) -> object:
            return (q[(i * b) % n_queries:][:b] @ x.T).topk(10)

        p50, p99 = timed(batch, reps)
        res["batched"][str(b)] = {"ms_batch_p50": p50, "ms_batch_p99": p99,
                                  "ms_per_query": p50 / b}
    faiss: Any = None
    try:
        import faiss
    except ImportError:
        pass
    if faiss is not None:
        faiss.omp_set_num_threads(1)
        if "faiss-flat" in methods:
            res["indexes"]["faiss-flat"] = faiss_flat(faiss, xn, qn, exact, reps)
        if "ivf" in methods:
            res["indexes"]["faiss-ivf"] = faiss_ivf(faiss, xn, qn, exact, reps, sweep["ivf"])
        if "faiss-hnsw" in methods:
            res["indexes"]["faiss-hnsw"] = faiss_hnsw(faiss, xn, qn, exact, reps,
                                                      sweep["hnsw"])
    if "hnswlib" in methods:
        try:
            import hnswlib
        except ImportError:
            hnswlib = None
        if hnswlib is not None:
            res["indexes"]["hnswlib"] = hnswlib_index(hnswlib, xn, qn, exact, reps,
                                                      sweep["hnsw"])
    return res


def _changes(n: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = rng.choice(n, CHANGED, replace=False).astype(np.int64)
    new = columns(CHANGED + APPENDED, "random", seed=7).numpy()
    return rows, np.ascontiguousarray(new[:CHANGED]), np.ascontiguousarray(new[CHANGED:])


def _sweep(search: Callable[[np.ndarray], np.ndarray], set_param: Callable[[int], None],
           params: list[int], qn: np.ndarray, exact: np.ndarray, reps: int) -> list[dict]:
    out = []
    for p in params:
        set_param(p)
        got = search(qn)
        p50, p99 = timed(lambda i: search(qn[i % len(qn)][None]), reps)
        out.append({"param": p, "recall@10": recall(got, exact), "ms_p50": p50, "ms_p99": p99})
    return out


def faiss_flat(faiss: Any, xn: np.ndarray, qn: np.ndarray, exact: np.ndarray,
               reps: int) -> dict:
    """faiss's exhaustive inner-product search on the matrix itself (no index, no copy)."""
    def search(qs: np.ndarray) -> np.ndarray:
        return faiss.knn(qs, xn, 60, metric=faiss.METRIC_INNER_PRODUCT)[1]

    got = search(qn)
    p50, p99 = timed(lambda i: search(qn[i % len(qn)][None]), reps)
    return {"build_s": 0.0, "extra_mb": 0.0, "sweep": [{"param": 0, "recall@10": recall(got, exact),
                                                         "ms_p50": p50, "ms_p99": p99}],
            "update_changed_ms": 0.0, "append_ms": 0.0}


def faiss_ivf(faiss: Any, xn: np.ndarray, qn: np.ndarray, exact: np.ndarray, reps: int,
              nprobes: list[int]) -> dict:
    n, w = xn.shape
    nlist = max(16, int(4 * np.sqrt(n)))
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(w)
    index = faiss.IndexIVFFlat(quantizer, w, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    rng = np.random.default_rng(0)
    index.train(xn[rng.choice(n, min(n, 40 * nlist), replace=False)])
    index.set_direct_map_type(faiss.DirectMap.Array)
    index.add(xn)
    build = time.perf_counter() - t0

    def search(qs: np.ndarray) -> np.ndarray:
        return index.search(qs, 60)[1]

    sweep = _sweep(search, lambda p: setattr(index, "nprobe", p),
                   [p for p in nprobes if p <= nlist], qn, exact, reps)
    rows, changed, appended = _changes(n, w)
    t0 = time.perf_counter()
    index.update_vectors(rows, changed)
    upd = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    index.add(appended)
    app = (time.perf_counter() - t0) * 1e3
    return {"nlist": nlist, "build_s": build, "extra_mb": (n * (w * 4 + 8) + nlist * w * 4) / 2**20,
            "sweep": sweep, "update_changed_ms": upd, "append_ms": app}


def faiss_hnsw(faiss: Any, xn: np.ndarray, qn: np.ndarray, exact: np.ndarray, reps: int,
               efs: list[int], m: int = 32) -> dict:
    """faiss's HNSW: appends only (no in-place update or removal of a row)."""
    n, w = xn.shape
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(w, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(xn)
    build = time.perf_counter() - t0

    def search(qs: np.ndarray) -> np.ndarray:
        return index.search(qs, 60)[1]

    sweep = _sweep(search, lambda e: setattr(index.hnsw, "efSearch", e), efs, qn, exact, reps)
    _, _, appended = _changes(n, w)
    t0 = time.perf_counter()
    index.add(appended)
    app = (time.perf_counter() - t0) * 1e3
    return {"M": m, "build_s": build, "extra_mb": n * (w * 4 + 2 * m * 4 * 1.1) / 2**20,
            "sweep": sweep, "update_changed_ms": None, "append_ms": app}


def hnswlib_index(hnswlib: Any, xn: np.ndarray, qn: np.ndarray, exact: np.ndarray, reps: int,
                  efs: list[int], m: int = 16) -> dict:
    """hnswlib's HNSW over inner product: a row is rewritten in place by adding its label again
    (the graph around it is repaired), appends after a resize."""
    n, w = xn.shape
    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=w)
    index.init_index(max_elements=n + APPENDED, M=m, ef_construction=100, random_seed=0)
    index.set_num_threads(1)
    index.add_items(xn, np.arange(n))
    build = time.perf_counter() - t0

    def search(qs: np.ndarray) -> np.ndarray:
        return index.knn_query(qs, 60)[0]

    sweep = _sweep(search, index.set_ef, efs, qn, exact, reps)
    rows, changed, appended = _changes(n, w)
    t0 = time.perf_counter()
    index.add_items(changed, rows)
    upd = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    index.add_items(appended, np.arange(n, n + APPENDED))
    app = (time.perf_counter() - t0) * 1e3
    return {"M": m, "build_s": build, "extra_mb": n * (w * 4 + 2 * m * 4 + 16) / 2**20,
            "sweep": sweep, "update_changed_ms": upd, "append_ms": app}


def report(runs: list[dict]) -> None:
    for r in runs:
        print(f"\n{r['items']:,} items, {r['text']} text, width {r['width']}")  # noqa: T201
        for dtype, m in r["storage"].items():
            print(f"  exact {dtype:5} {m['bytes_per_item']:5.0f} B/item {m['matrix_mb']:7.1f} MB "  # noqa: T201
                  f"p50 {m['ms_p50']:7.2f} p99 {m['ms_p99']:7.2f} ms recall@10 "
                  f"{m['recall@10']:.3f}")
        one = r["batched"]["1"]["ms_batch_p50"]
        for b, m in r["batched"].items():
            print(f"  exact fp32 batch {b:>3}: {m['ms_batch_p50']:7.2f} ms / batch, "  # noqa: T201
                  f"{m['ms_per_query']:6.2f} ms / query ({one / m['ms_per_query']:.1f}x)")
        for name, ix in r["indexes"].items():
            upd = ix["update_changed_ms"]
            print(f"  {name}: build {ix['build_s']:.1f} s, +{ix['extra_mb']:.0f} MB, "  # noqa: T201
                  f"{CHANGED} rows rewritten "
                  f"{'n/a' if upd is None else f'{upd:.1f} ms'}, {APPENDED} appended "
                  f"{ix['append_ms']:.1f} ms")
            for s in ix["sweep"]:
                print(f"      param {s['param']:5}: recall@10 {s['recall@10']:.3f} "  # noqa: T201
                      f"p50 {s['ms_p50']:7.2f} p99 {s['ms_p99']:7.2f} ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, action="append")
    ap.add_argument("--text", action="append", choices=["random", "topics"])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--reps", type=int, default=60, help="timed single queries per point")
    ap.add_argument("--methods", default="faiss-flat,ivf,faiss-hnsw,hnswlib")
    ap.add_argument("--nprobe", default="4,8,16,32,64,128,256,512")
    ap.add_argument("--ef", default="32,64,128,256,512")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = set(args.methods.split(",")) - {""}
    sweep = {"ivf": [int(v) for v in args.nprobe.split(",")],
             "hnsw": [int(v) for v in args.ef.split(",")]}
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.items or [100_000]:
        for text in args.text or ["random"]:
            runs.append(measure(n, text, args.queries, methods, args.reps, sweep))
            report(runs[-1:])
            (args.out / "retrieval.json").write_text(json.dumps({"runs": runs}, indent=1))


if __name__ == "__main__":
    main()
