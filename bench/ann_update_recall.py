"""Does an IVF index updated in place lose recall as the model learns? In process, no server.

    python -m bench.ann_update_recall --items 1000000 --out bench/out

A real learner (`consumers.trainer.build_learner`, the default linear tower) over `--items`
title-blended items (`bench.serving.title_features`) learns 20,000 Zipf(1.3) events in
micro-batches of 256; the API's `service.ann.AnnIndex` is built and tuned on its Scorer as the
server does. Then `--steps` times: 2,048 more events, the rows they changed written into the
index in place (`AnnIndex.update`, as the holder does per version), and recall@10 at the tuned
nprobe for three sets of 100 sampled histories (`service.holder._sampled_users`, seeds 0-2),
both as the server serves (candidates rescored, against the Scorer's exact top-10) and on the
index's own vectors (what the server's periodic check measures). Prints a table, writes
DIR/ann_update_recall.json and DIR/ann_update_recall.png.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def learning_catalog(n_items: int) -> tuple[Any, Callable[[int], None]]:
    """A real learner (`consumers.trainer.build_learner`, the default linear tower) over
    `n_items` title-blended items, and `learn(n)`: n more Zipf(1.3) events of 10,000 users in
    micro-batches of 256 (shared by bench.ann_norms)."""
    from bench.serving import title_features
    from consumers.settings import TrainerSettings
    from consumers.trainer import build_learner
    from model.events import Interaction

    torch.set_num_threads(1)
    learner = build_learner(TrainerSettings(device="cpu", hmac_key="x" * 32))
    feats = title_features(n_items)
    learner.set_text_features({str(i): feats[i] for i in range(n_items)}, {})
    rng = np.random.default_rng(0)
    clock = [0]

    def learn(n: int) -> None:
        items = np.minimum(rng.zipf(1.3, size=n), n_items) - 1
        users = rng.integers(0, 10_000, size=n)
        events = [Interaction(f"u{u}", str(i), float(clock[0] + t))
                  for t, (u, i) in enumerate(zip(users, items, strict=True))]
        clock[0] += n
        for start in range(0, n, 256):
            learner.learn(events[start: start + 256])

    return learner, learn


def run(n_items: int, steps: int) -> dict:
    from service import ann
    from service.holder import _sampled_users

    learner, learn = learning_catalog(n_items)
    learn(20_000)
    scorer = learner.scorer()
    index = ann.AnnIndex(target_recall=0.97)
    t0 = time.perf_counter()
    index.build(scorer)
    index.tune(scorer, _sampled_users(scorer, 200, seed=0))
    built_s = time.perf_counter() - t0

    def measure(s) -> dict:  # noqa: ANN001 - model.scorer.Scorer
        served, own = [], []
        for seed in (0, 1, 2):
            users = _sampled_users(s, 100, seed=seed)
            served.append(index._recall(s, users, ann._exact_top(s, users, 10), 10))
            q = index._q(ann._queries(s, users))  # as the index searches (equal norms)
            exact = index._stored_top(q, 10)
            _, got = index.index.search(q, 10)
            own.append(sum(len(set(g.tolist()) & set(e.tolist()))
                           for g, e in zip(got, exact, strict=True)) / exact.size)
        return {"served": served, "own": own}

    rows = [{"events": 20_000, "rows_written": 0, **measure(scorer)}]
    for step in range(steps):
        learn(2048)
        scorer = learner.scorer()
        changed = scorer.changed if scorer.changed is not None else torch.arange(len(scorer))
        index.update(scorer, changed)
        rows.append({"events": 20_000 + 2048 * (step + 1), "rows_written": len(changed),
                     **measure(scorer)})
    return {"items": n_items, "nlist": index.nlist, "nprobe": index.nprobe,
            "tuned_recall": index.recall, "build_and_tune_s": built_s, "steps": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--items", type=int, action="append")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run(n, args.steps) for n in args.items or [100_000]]
    for r in runs:
        print(f"\n{r['items']:,} items: IVF nlist {r['nlist']}, tuned nprobe {r['nprobe']} "
              f"(recall {r['tuned_recall']:.3f})")
        print(f"{'events':>8} {'rows written':>13}   recall@10 served (seeds 0-2)   own vectors")
        for s in r["steps"]:
            print(f"{s['events']:>8,} {s['rows_written']:>13,}   "
                  f"{' '.join(f'{x:.3f}' for x in s['served']):>27}   "
                  f"{' '.join(f'{x:.3f}' for x in s['own'])}")
    (out / "ann_update_recall.json").write_text(json.dumps(
        {"runs": runs, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot([s["events"] for s in r["steps"]], [min(s["served"]) for s in r["steps"]],
                marker="o", label=f"{r['items']:,} items (worst of 3 seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("events learned (rows written in place after 20,000)")
    ax.set_ylabel("recall@10 at the tuned nprobe")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ann_update_recall.png", dpi=100)
    print(f"\nwrote {out / 'ann_update_recall.json'} and {out / 'ann_update_recall.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
