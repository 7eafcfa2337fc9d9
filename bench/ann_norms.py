"""IVF lists on inner products as the model learns: plain rows against rows stored at one norm.

    python -m bench.ann_norms --items 100000 --items 1000000 --out bench/ann_norms

Why: at 1M items the served index (`freshrec bench serving`) answered recall@10 0.85 to real
requests while it had been tuned to 1.000 on random 3-item histories, and its periodic check
asked for 16x the lists fifteen seconds after a build. In process, with the same index class:
a real learner (`consumers.trainer.build_learner`, the default linear tower, real MiniLM over
title-blended items as in `bench.serving`) learns `--warm` Zipf(1.3) events in micro-batches of
256, then two `service.ann.AnnIndex`es are built and tuned on its Scorer, one with
`equal_norms=False` (the inner-product lists as before) and one with `equal_norms=True` (each row
stored with a column that brings it to one norm, queries with a zero there). Then `--steps` times
`--step-events` more events are learned and the rows they changed written into both indexes in
place, as the server does per version. After each step, for 300 user-like queries (histories
of 5-20 Zipf items plus 0-3 uniform ones, like the benchmark's users): recall@10 at each
index's tuned nprobe (served path: candidates rescored, against the exact top-10), and the
smallest nprobe (powers of two) that reaches 0.97. Prints a table, writes DIR/ann_norms.json
and DIR/ann_norms.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def user_queries(scorer: Any, n_items: int, n: int, seed: int) -> torch.Tensor:
    """(n, d) user vectors of histories like the serving benchmark's users'."""
    rng = np.random.default_rng(seed)
    hists = []
    for _ in range(n):
        hist = [str(min(int(x), n_items) - 1) for x in rng.zipf(1.3, size=int(rng.integers(5, 20)))]
        hist += [str(int(x)) for x in rng.integers(0, n_items, size=int(rng.integers(0, 4)))]
        rng.shuffle(hist)
        hists.append(hist)
    return scorer.user_vectors(hists)


def run(n_items: int, warm: int, step_events: int, steps: int) -> dict[str, Any]:
    from bench.ann_update_recall import learning_catalog
    from service import ann

    learner, learn = learning_catalog(n_items)
    learn(warm)
    scorer = learner.scorer()
    indexes: dict[str, Any] = {}
    built: dict[str, dict[str, Any]] = {}
    for name, equal in (("plain", False), ("equal_norms", True)):
        t0 = time.perf_counter()
        index = ann.AnnIndex(target_recall=0.97, equal_norms=equal)
        index.build(scorer)
        index.tune(scorer, user_queries(scorer, n_items, 200, seed=0))
        indexes[name] = index
        built[name] = {"nlist": index.nlist, "nprobe": index.nprobe, "recall": index.recall,
                       "build_and_tune_s": time.perf_counter() - t0}

    def needed(index: Any, s: Any, q: torch.Tensor, exact: torch.Tensor) -> int | None:
        try:
            for p in PROBES:
                index.index.nprobe = p
                if index._recall(s, q, exact, 10) >= 0.97:
                    return p
            return None
        finally:
            index.index.nprobe = index.nprobe

    rows = []
    for step in range(steps + 1):
        if step:
            learn(step_events)
            scorer = learner.scorer()
            changed = scorer.changed if scorer.changed is not None else torch.arange(len(scorer))
            for index in indexes.values():
                index.update(scorer, changed)
        q = user_queries(scorer, n_items, 300, seed=100 + step)
        exact = ann._exact_top(scorer, q, 10)
        rows.append({"events": warm + step * step_events, **{
            name: {"recall_at_tuned": index._recall(scorer, q, exact, 10),
                   "nprobe_for_0.97": needed(index, scorer, q, exact)}
            for name, index in indexes.items()}})
    return {"items": n_items, "built": built, "steps": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--items", type=int, action="append")
    ap.add_argument("--warm", type=int, default=20_000, help="events learned before the build")
    ap.add_argument("--step-events", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run(n, args.warm, args.step_events, args.steps) for n in args.items or [100_000]]
    for r in runs:
        print(f"\n{r['items']:,} items: " + "; ".join(
            f"{name} nlist {b['nlist']}, tuned nprobe {b['nprobe']} (recall {b['recall']:.3f})"
            for name, b in r["built"].items()))
        print(f"{'events':>9}   {'plain: recall at tuned / nprobe for 0.97':>42}   "
              f"{'equal norms: recall at tuned / nprobe for 0.97':>48}")
        for s in r["steps"]:
            cells = [f"{s[n]['recall_at_tuned']:.3f} / {s[n]['nprobe_for_0.97'] or '>256'}"
                     for n in ("plain", "equal_norms")]
            print(f"{s['events']:>9,}   {cells[0]:>42}   {cells[1]:>48}")
    (out / "ann_norms.json").write_text(json.dumps(
        {"runs": runs, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        for name, style in (("plain", "--"), ("equal_norms", "-")):
            ax.plot([s["events"] for s in r["steps"]],
                    [s[name]["recall_at_tuned"] for s in r["steps"]], style, marker="o",
                    label=f"{r['items']:,} items, {name}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("events learned (rows written in place after the build)")
    ax.set_ylabel("recall@10 at the tuned nprobe")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ann_norms.png", dpi=100)
    print(f"\nwrote {out / 'ann_norms.json'} and {out / 'ann_norms.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
