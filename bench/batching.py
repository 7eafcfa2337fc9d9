"""Batching concurrent /recommend rankings (service/batcher.py) against one scan per request.

    python -m bench.batching --items 100000 --items 1000000 --out bench/out

In process, no HTTP: a linear-tower Scorer over N synthetic items (random unit text
projections, small ID rows) and 16 client threads, as the API's thread pool runs the route.
Per N and mode (`torch` / `faiss`: one `Scorer.rank_batch` per request with torch's scan / with
`service.ann.ExactScan`, as the API serves from 10k items; `+batch`: through `Batcher`):
open-loop latency p50/p99 at --rate req/s (arrivals on a fixed schedule, latency counted from
the scheduled time, so queueing shows) and closed-loop max throughput (16 threads, no pause).
The modes alternate in one process, so they share the machine's noise. Writes batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.config import ModelConfig
from model.scorer import Scorer
from model.towers import TwoTower
from service.batcher import Batcher

try:
    from service.ann import ExactScan
except ImportError:  # faiss missing: torch's scan only
    ExactScan = None  # type: ignore[assignment,misc]

H = 384  # MiniLM's width


def scorer(n: int) -> Scorer:
    torch.manual_seed(0)
    net = TwoTower(ModelConfig(item_tower="linear"), H, 0).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    basis = net.adapter.basis
    assert isinstance(basis, torch.Tensor)
    base = torch.nn.functional.normalize(torch.randn(n, basis.shape[1]), dim=1)
    table = torch.randn(n, net.cfg.dim) * 0.05
    return Scorer(net, torch.zeros(0, H), [f"i{j}" for j in range(n)], base=base, ids=table)


def requests(n: int, count: int, seed: int = 3) -> list[tuple[list[str], set[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        hist = [f"i{rng.randrange(n)}" for _ in range(20)]
        out.append((hist, set(hist)))
    return out


def open_loop(rank: Callable[[list[str], set[str]], object], reqs: list, rate: float,
              seconds: float, threads: int = 16) -> dict[str, float]:
    """Requests scheduled every 1/rate s over `threads` workers; latency from the schedule."""
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05
    lat: list[float] = []
    nxt = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            hist, excl = reqs[i % len(reqs)]
            rank(hist, excl)
            lat.append((time.perf_counter() - due) * 1e3)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    lat.sort()
    return {"p50_ms": statistics.median(lat), "p99_ms": lat[int(0.99 * (len(lat) - 1))],
            "achieved_rps": total / (time.perf_counter() - start)}


def closed_loop(rank: Callable[[list[str], set[str]], object], reqs: list, seconds: float,
                threads: int = 16) -> float:
    stop = time.perf_counter() + seconds
    done = [0] * threads

    def worker(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            hist, excl = reqs[i % len(reqs)]
            rank(hist, excl)
            done[w] += 1
            i += threads

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


Rank = Callable[[list[str], set[str]], object]


def direct(s: Scorer) -> Rank:
    def rank(h: list[str], e: set[str]) -> object:
        return s.rank_batch([h], 10, [e])[0]
    return rank


def batched(s: Scorer, b: Batcher) -> Rank:
    """Through `Batcher` on an event loop of its own, as the API's requests are (the client
    threads hand each request to the loop: a hop the API's requests do not make)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def rank(h: list[str], e: set[str]) -> object:
        return asyncio.run_coroutine_threadsafe(b.rank(s, h, 10, e), loop).result()
    return rank


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, action="append")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two modes")
    ap.add_argument("--modes", default="", help="a subset of torch,torch+batch,faiss,faiss+batch")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for n in args.items or [100_000]:
        s = scorer(n)
        f = None
        if ExactScan is not None:  # the same Scorer with what the API attaches from 10k items
            f = object.__new__(Scorer)
            f.__dict__.update(s.__dict__)
            f.ann = ExactScan()
        reqs = requests(n, 2000)
        batchers = {"torch+batch": Batcher(), "faiss+batch": Batcher()}
        modes = {"torch": direct(s), "torch+batch": batched(s, batchers["torch+batch"])}
        if f is not None:
            modes["faiss"] = direct(f)
            modes["faiss+batch"] = batched(f, batchers["faiss+batch"])
        if args.modes:
            modes = {m: r for m, r in modes.items() if m in args.modes.split(",")}
        res: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
        for _ in range(args.rounds):
            for mode, rank in modes.items():
                got = open_loop(rank, reqs, args.rate, args.seconds)
                got["max_rps"] = closed_loop(rank, reqs, args.seconds)
                for key, v in got.items():
                    res[mode].setdefault(key, []).append(v)
        summary = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in res.items()}
        mean_batch = {m: b.requests / max(1, b.batches) for m, b in batchers.items()}
        runs.append({"items": n, "rate": args.rate, "mean_batch": mean_batch,
                     "modes": summary, "raw": res})
        d = summary[next(iter(summary))]
        print(f"{n:,} items, {args.rate:.0f} req/s open loop, 16 threads, medians of "  # noqa: T201
              f"{args.rounds} rounds")
        for m, r in summary.items():
            print(f"  {m:11} p50 {r['p50_ms']:8.1f} ms p99 {r['p99_ms']:8.1f} ms "  # noqa: T201
                  f"achieved {r['achieved_rps']:6.1f} req/s max {r['max_rps']:6.1f} req/s")
            print(f"  {'':8} vs the first: p99 {r['p99_ms'] / d['p99_ms']:.2f}x, max "  # noqa: T201
                  f"throughput {r['max_rps'] / d['max_rps']:.2f}x")
        print("  mean batch: " + ", ".join(f"{m} {v:.1f}" for m, v in mean_batch.items()))  # noqa: T201
        del s, f, modes
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.json").write_text(json.dumps({"runs": runs}, indent=1))


if __name__ == "__main__":
    main()
