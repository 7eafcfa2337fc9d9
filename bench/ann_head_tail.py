"""Would an index over the never-learned tail prune where one over the whole catalog does not?

    python -m bench.ann_head_tail --items 100000 --events 40000 --out bench/out

The serving benchmark's IVF index needed nprobe 440 of 1,264 lists at 100k items (0.7x the
exact scan: refused) and 800 of 4,000 at 1M (1.7x) for recall@10 0.97 on title-shaped text
features. The hypothesis measured here: the learned ID parts of the items the stream touched
(the "head": rows with a non-zero ID row) dominate the top-10 and do not follow the text
clusters, while the never-learned tail's columns [s t | s | 0] are text only (and the same in
every version: no version changes them). So: exact scores over the head, an IVF index over the
tail only, candidates from both rescored exactly.

A real learner (`consumers.trainer.build_learner`: real MiniLM config, `head` policy, the
default linear tower) over `--items` title-blended items (`bench.serving.title_features`)
learns `--events` Zipf(1.3)-popular interactions of 10k users in micro-batches of 256 (what the
serving benchmark's producer sends). Then, for 200 sampled users' histories, recall@10 against
exact top-10 and the time per query (batch 1 and 8, one thread) of: the exact scan; IVF over
everything (nprobe doubling); exact head + IVF tail (nprobe doubling). Prints a table, writes
DIR/ann_head_tail.json and DIR/ann_head_tail.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

K = 10
FETCH = 60  # candidates per source before exact rescoring (k + the index's overfetch of 50)
_KEEP: list = []  # quantizers of the indexes built here


def trained_scorer(n_items: int, events: int):  # noqa: ANN201 - model.scorer.Scorer
    from bench.serving import title_features
    from consumers.settings import TrainerSettings
    from consumers.trainer import build_learner
    from model.events import Interaction

    torch.set_num_threads(1)
    learner = build_learner(TrainerSettings(device="cpu", hmac_key="x" * 32))
    feats = title_features(n_items)
    learner.set_text_features({str(i): feats[i] for i in range(n_items)}, {})
    rng = np.random.default_rng(0)
    items = np.minimum(rng.zipf(1.3, size=events), n_items) - 1
    users = rng.integers(0, 10_000, size=events)
    stream = [Interaction(f"u{u}", str(i), float(t)) for t, (u, i) in enumerate(zip(users, items,
                                                                                   strict=True))]
    t0 = time.perf_counter()
    for start in range(0, events, 256):
        learner.learn(stream[start: start + 256])
    print(f"learned {events:,} events in {time.perf_counter() - t0:.0f} s", flush=True)
    hist = [[str(i) for i in rng.choice(items, size=5)] for _ in range(200)]
    return learner.scorer(), hist


def timed(fn, q: np.ndarray) -> dict[str, float]:  # noqa: ANN001
    out = {}
    for size in (1, 8):
        times = []
        for start in range(0, len(q) - size + 1, size):
            t0 = time.perf_counter()
            fn(q[start: start + size])
            times.append(time.perf_counter() - t0)
        out[f"batch{size}_ms_per_query"] = 1e3 * float(np.median(times)) / size
    return out


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(e)) / K for f, e in zip(found, exact, strict=True)]))


def ivf(x: np.ndarray, seed: int = 0):  # noqa: ANN201 - faiss.IndexIVFFlat
    import faiss

    n, w = x.shape
    nlist = max(16, min(int(4 * np.sqrt(n)), n // 39))
    sample = x[np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)]
    quantizer = faiss.IndexFlatIP(w)
    index = faiss.IndexIVFFlat(quantizer, w, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.spherical = seed, True
    index.train(sample)
    index.add(x)
    _KEEP.append(quantizer)  # faiss holds a raw pointer to it
    return index


def measure(n_items: int, events: int) -> dict:
    import faiss

    from service.ann import _queries

    faiss.omp_set_num_threads(1)
    scorer, hist = trained_scorer(n_items, events)
    cols = np.ascontiguousarray(scorer.cols.numpy())
    q = _queries(scorer, scorer.user_vectors(hist))
    exact = np.argsort(-(q @ cols.T), axis=1)[:, :K]
    d = scorer.net.cfg.dim
    learned = np.abs(cols[:, -d:]).sum(axis=1) > 0
    head = np.flatnonzero(learned)
    tail = np.flatnonzero(~learned)
    in_head = float(np.mean(learned[exact]))
    print(f"{n_items:,} items: {len(head):,} with learned ID rows ({len(head) / n_items:.1%}); "
          f"{in_head:.1%} of the exact top-10 among them", flush=True)

    def scan(qb: np.ndarray) -> np.ndarray:
        return np.argpartition(-(qb @ cols.T), K, axis=1)[:, :K]

    rows = [{"method": "exact scan", "nprobe": None, "recall@10": 1.0, **timed(scan, q)}]
    full = ivf(cols)
    tail_index = ivf(cols[tail]) if len(tail) > 1000 else None
    head_cols = np.ascontiguousarray(cols[head])

    def rescored(qb: np.ndarray, cand: np.ndarray) -> np.ndarray:
        out = []
        for row, c in zip(qb, cand, strict=True):
            c = c[c >= 0]
            out.append(c[np.argsort(-(cols[c] @ row))[:K]])
        return np.array(out)

    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        if nprobe > full.nlist:
            break
        full.nprobe = nprobe

        def via_full(qb: np.ndarray) -> np.ndarray:
            return rescored(qb, full.search(qb, FETCH)[1])

        r = recall(via_full(q), exact)
        rows.append({"method": "IVF over everything", "nprobe": nprobe, "recall@10": r,
                     **timed(via_full, q)})
        if tail_index is None or nprobe > tail_index.nlist:
            continue
        tail_index.nprobe = nprobe

        def via_split(qb: np.ndarray) -> np.ndarray:
            h = head[np.argpartition(-(qb @ head_cols.T), min(FETCH, len(head) - 1),
                                     axis=1)[:, :FETCH]]
            t = tail[np.clip(tail_index.search(qb, FETCH)[1], 0, None)]
            return rescored(qb, np.concatenate([h, t], axis=1))

        r2 = recall(via_split(q), exact)
        rows.append({"method": "exact head + IVF tail", "nprobe": nprobe, "recall@10": r2,
                     **timed(via_split, q)})
        if r >= 0.99 and r2 >= 0.99:
            break
    return {"items": n_items, "events": events, "head": len(head),
            "exact_top10_in_head": in_head, "nlist_full": full.nlist,
            "nlist_tail": tail_index.nlist if tail_index is not None else None, "rows": rows}


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        exact = run["rows"][0]["batch8_ms_per_query"]
        for method in ("IVF over everything", "exact head + IVF tail"):
            pts = [(r["recall@10"], exact / r["batch8_ms_per_query"]) for r in run["rows"]
                   if r["method"] == method]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axvline(0.95, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="recall@10 vs exact", ylabel="speed-up over the exact scan (batches of 8)",
               title=f"{run['items']:,} items, {run['head']:,} learned", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, action="append", help="catalog size (repeatable)")
    ap.add_argument("--events", type=int, default=40_000)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.items or [100_000]:
        run = measure(n, args.events)
        runs.append(run)
        print(f"\n{n:,} items, {run['head']:,} learned; top-10 in the learned head: "
              f"{run['exact_top10_in_head']:.1%}")
        print(f"{'method':<24}{'nprobe':>8}{'recall@10':>11}{'ms/q (1)':>10}{'ms/q (8)':>10}")
        for r in run["rows"]:
            print(f"{r['method']:<24}{r['nprobe'] or '-':>8}{r['recall@10']:>11.3f}"
                  f"{r['batch1_ms_per_query']:>10.2f}{r['batch8_ms_per_query']:>10.2f}")
    (out / "ann_head_tail.json").write_text(json.dumps({"runs": runs, "date": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2))
    plot(runs, out / "ann_head_tail.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
