"""Where the trainer's time goes on a large catalog: `Trainer.on_poll` in process, profiled.

    python -m bench.trainer_profile --items 100000 --items 1000000 --out bench/out

The real `Trainer` (real MiniLM `head` policy, the default item tower, one torch thread, a real
Redis for the weight store) over a synthetic catalog of `--items` items whose text features are
random unit vectors (as `freshrec bench serving` seeds them), fed polls of `--per-poll`
interactions (Zipf-popular items, 10k users) as fast as it takes them, with the wall clock as
its clock, so micro-batches close and versions are gated and published as in the live trainer.
No Kafka: this is the trainer's own ceiling, the upper bound of `freshrec bench serving`'s
intake figure (which also pays for the broker, the decoding and a busy machine).

Per catalog size: events/s over `--events` events after a 2,000-event warm-up, versions
published, and the functions that took the most cumulative time (cProfile). Writes
DIR/trainer_profile.json and DIR/trainer_profile.png and prints a table.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def profile(n_items: int, events: int, per_poll: int, redis_url: str, top: int) -> dict:
    import redis
    import torch
    from kafka.structs import TopicPartition

    from consumers.loop import Polled
    from consumers.settings import TrainerSettings
    from consumers.trainer import Trainer, build_learner
    from model.events import Interaction
    from protocol.features import FeatureStore
    from protocol.topics import Source
    from protocol.weights import WeightStore

    torch.set_num_threads(1)
    ns = f"trainer-profile-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    s = TrainerSettings(redis_url=redis_url, namespace=ns, hmac_key=key, trainer_metrics_port=0,
                        device="cpu")
    learner = build_learner(s)
    client = redis.Redis.from_url(redis_url)
    trainer = Trainer(s, learner, WeightStore(client, key.encode(), ns), FeatureStore(client, ns))
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n_items, learner.encoder.dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    learner.set_text_features({str(i): feats[i] for i in range(n_items)}, {})
    total = events + 2000
    items = np.minimum(rng.zipf(1.3, size=total), n_items) - 1
    users = rng.integers(0, 10_000, size=total)
    tp = TopicPartition("interactions", 0)

    def feed(start: int, count: int) -> float:
        t0 = time.perf_counter()
        for off in range(start, start + count, per_poll):
            end = min(start + count, off + per_poll)
            polled = [(Source("interactions", 0, o, int(time.time() * 1000)),
                       Interaction(f"u{users[o]}", str(items[o]), float(o)))
                      for o in range(off, end)]
            trainer.on_poll(Polled(interactions=polled, offsets={tp: end}), time.monotonic())
        return time.perf_counter() - t0

    try:
        feed(0, 2000)  # the first full snapshot and the first scorers
        published = trainer.published
        prof = cProfile.Profile()
        prof.enable()
        seconds = feed(2000, events)
        prof.disable()
    finally:
        for k in client.scan_iter(f"{ns}:*", count=1000):
            client.delete(k)
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, fn), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = Path(path)
        if where.is_relative_to(ROOT) and not where.is_relative_to(ROOT / ".venv"):
            rows.append((cum, f"{where.relative_to(ROOT)}:{line}({fn})"))
    rows.sort(reverse=True)
    return {"items": n_items, "events": events, "seconds": seconds,
            "events_per_s": events / seconds, "versions": trainer.published - published,
            "top": [{"where": w, "share": c / seconds} for c, w in rows[:top]]}


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for a, run in zip(ax[0], runs, strict=True):
        top = run["top"][1:9]  # the first is on_poll itself
        a.barh([t["where"].split("(")[-1].rstrip(")") for t in top][::-1],
               [100 * t["share"] for t in top][::-1])
        a.set(xlabel="% of the trainer's time (cumulative)",
              title=f"{run['items']:,} items: {run['events_per_s']:,.0f} events/s")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, action="append", help="catalog size (repeatable)")
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--per-poll", type=int, default=50, help="interactions per poll")
    ap.add_argument("--top", type=int, default=15, help="functions listed per size")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.items or [100_000]:
        print(f"== {n:,} items", flush=True)
        runs.append(profile(n, args.events, args.per_poll, args.redis, args.top))
    for run in runs:
        print(f"\n{run['items']:,} items: {run['events_per_s']:,.0f} events/s "
              f"({run['events']:,} events in {run['seconds']:.1f} s, {run['versions']} versions)")
        for t in run["top"]:
            print(f"  {100 * t['share']:5.1f}%  {t['where']}")
    (out / "trainer_profile.json").write_text(json.dumps({"runs": runs, "config": vars(args)},
                                                          indent=1))
    plot(runs, out / "trainer_profile.png")
    print(f"\nwrote {out / 'trainer_profile.json'} and {out / 'trainer_profile.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
