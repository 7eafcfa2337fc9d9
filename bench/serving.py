"""Serving budgets of shared/DESIGN.md, measured on a private stack on this machine.

    python -m bench.serving --out bench/out            # defaults below; ~3 minutes

Starts its own Tansu broker, the features consumer, the trainer (real MiniLM, `head` policy)
and the API (uvicorn, one process), in a fresh Redis namespace of the local Redis. The catalog
has `--items` items; their text features are seeded into the shared feature memo as random unit
vectors so neither the trainer nor the API spends minutes encoding 100k synthetic titles (the
latency of ranking does not depend on the values). Then, at the same time for `--seconds`:

- a producer sends `--rate` interactions/s (Zipf-popular items, 10k users) to Kafka;
- a load generator sends `--qps` GET /recommend/s open-loop (fixed schedule, 16 threads).

Reported: freshness p50/p99 (the API's `freshrec_freshness_seconds` histogram: produce time ->
serving a version trained on it), client-side /recommend latency p50/p99 over HTTP, failed
requests, hot swaps during the run, and the trainer's intake (a second phase produces
`--burst` events as fast as possible and times the trainer through them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(url: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def histogram_quantile(q: float, metrics: dict[str, float], name: str) -> float:
    """Prometheus-style linear interpolation inside the bucket holding the q-quantile."""
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in metrics.items()
                     if k.startswith(name + "_bucket"))
    total = buckets[-1][1] if buckets else 0
    if not total:
        return float("nan")
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return prev_le


def seed_catalog(redis_url: str, namespace: str, n_items: int) -> None:
    import redis

    from model.encoder import default_encoder_path, encoder_identity
    from model.events import Item
    from protocol.features import FeatureStore

    store = FeatureStore(redis.Redis.from_url(redis_url), namespace)
    identity = encoder_identity(default_encoder_path())
    rng = np.random.default_rng(0)
    for start in range(0, n_items, 5000):
        ids = [str(i) for i in range(start, min(n_items, start + 5000))]
        store.upsert_items([Item(i, f"synthetic item {i}") for i in ids])
        vecs = rng.standard_normal((len(ids), 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        store.put_text_features(identity, dict(zip(ids, vecs, strict=True)))


class Producer(threading.Thread):
    """Sends `rate` events/s (0 = as fast as possible) until `count` or `stop`."""

    def __init__(self, bootstrap: str, topic: str, n_items: int, rate: float, count: int) -> None:
        super().__init__(daemon=True)
        from kafka import KafkaProducer

        self.p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
        self.topic, self.rate, self.count = topic, rate, count
        pool = min(count, 1_000_000)  # cycled: never allocate per-event draws for huge counts
        self.items = np.minimum(np.random.default_rng(1).zipf(1.3, size=pool), n_items) - 1
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        rng = random.Random(2)
        for n in range(self.count):
            if self.stop.is_set():
                break
            if self.rate:
                delay = t0 + n / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            user = f"u{rng.randrange(10_000)}"
            body = {"user_id": user, "item_id": str(int(self.items[n % len(self.items)])),
                    "event": "click",
                    "ts": time.time()}
            self.p.send(self.topic, key=user.encode(), value=json.dumps(body).encode())
            self.sent += 1
        self.p.flush()


def load(base: str, qps: float, seconds: float, results: list) -> None:  # noqa: ANN001
    """Open-loop GETs on a fixed schedule: latency counts from the scheduled send time."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    local = threading.local()
    rng = random.Random(3)

    def one(scheduled: float, user: str) -> None:
        client = getattr(local, "c", None) or httpx.Client(base_url=base, timeout=10)
        local.c = client
        delay = scheduled - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            r = client.get("/recommend", params={"user_id": user, "k": 10})
            status, version = r.status_code, r.json().get("model_version", -1)
        except Exception:  # noqa: BLE001 - a failed request is a result, not a crash
            status, version = 0, -1
        results.append((scheduled, time.monotonic() - scheduled, status, version))

    start = time.monotonic() + 0.5
    with ThreadPoolExecutor(16) as pool:
        for n in range(int(qps * seconds)):
            pool.submit(one, start + n / qps, f"u{rng.randrange(10_000)}")
            while start + n / qps - time.monotonic() > 1.0:  # keep the queue short
                time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--qps", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--burst", type=int, default=40_000)
    ap.add_argument("--redis", default=os.environ.get("FRESHREC_REDIS_URL",
                                                      "redis://127.0.0.1:6379/0"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from freshrec.services import start_tansu

    ns = f"bench-{uuid.uuid4().hex[:8]}"
    kport, aport, tport = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "FRESHREC_NAMESPACE": ns,
           "FRESHREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{kport}", "FRESHREC_REDIS_URL": args.redis,
           "FRESHREC_HMAC_KEY": uuid.uuid4().hex, "FRESHREC_TRAINER_METRICS_PORT": str(tport),
           "FRESHREC_FEATURES_METRICS_PORT": "0", "FRESHREC_DEVICE": "cpu",
           # two cores: one for the trainer's torch, one for the API (it uses one thread)
           "FRESHREC_TORCH_THREADS": os.environ.get("FRESHREC_TORCH_THREADS", "1")}
    logs = out / "serving-logs"
    logs.mkdir(exist_ok=True)
    procs = [start_tansu(kport, logs / "tansu.log")]
    from protocol.topics import ensure_topics

    ensure_topics(env["FRESHREC_KAFKA_BOOTSTRAP"], ["freshrec.interactions", "freshrec.items",
                                                    "freshrec.dlq"], 4)
    t0 = time.monotonic()
    print(f"seeding {args.items:,} items ...", flush=True)
    seed_catalog(args.redis, ns, args.items)
    for name, argv_ in [("features", ["-m", "consumers.features"]),
                        ("trainer", ["-m", "consumers.trainer"]),
                        ("api", ["-m", "uvicorn", "service.app:app", "--port", str(aport),
                                 "--log-level", "warning"])]:
        procs.append(subprocess.Popen([sys.executable, *argv_], env=env, cwd=ROOT,
                                      stdout=(logs / f"{name}.log").open("wb"),
                                      stderr=subprocess.STDOUT))
    base = f"http://127.0.0.1:{aport}"
    import httpx

    try:
        warm = Producer(env["FRESHREC_KAFKA_BOOTSTRAP"], "freshrec.interactions", args.items,
                        args.rate, 10**9)
        warm.start()
        while True:  # until a version over the whole catalog is served
            try:
                m = httpx.get(f"{base}/model", timeout=2).json()
                if m["version"] > 0 and m["catalog_items"] >= args.items:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 600:
                raise SystemExit("stack did not serve a version within 10 minutes; see logs")
            time.sleep(1)
        print(f"stack ready in {time.monotonic() - t0:.0f} s; measuring {args.seconds:.0f} s",
              flush=True)
        before = _metrics(f"{base}/metrics")
        swaps0 = httpx.get(f"{base}/model").json()["swaps"]
        results: list = []
        load(base, args.qps, args.seconds, results)
        after = _metrics(f"{base}/metrics")
        swaps = httpx.get(f"{base}/model").json()["swaps"] - swaps0
        warm.stop.set()
        warm.join()
        fresh = {k: after[k] - before.get(k, 0.0) for k in after
                 if k.startswith("freshrec_freshness_seconds_bucket")}
        lat = np.array([r[1] for r in results])
        failed = sum(1 for r in results if r[2] != 200)
        # intake: as fast as possible, timed through the trainer's own counter
        tm = f"http://127.0.0.1:{tport}/metrics"
        e0 = _metrics(tm)["freshrec_trainer_events_total"]
        burst = Producer(env["FRESHREC_KAFKA_BOOTSTRAP"], "freshrec.interactions", args.items,
                         0, args.burst)
        b0 = time.monotonic()
        burst.start()
        while _metrics(tm)["freshrec_trainer_events_total"] - e0 < args.burst:
            if time.monotonic() - b0 > 300:
                break
            time.sleep(0.2)
        done = _metrics(tm)["freshrec_trainer_events_total"] - e0
        intake = done / (time.monotonic() - b0)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        import redis

        r = redis.Redis.from_url(args.redis)
        for key in r.scan_iter(f"{ns}:*", count=1000):
            r.delete(key)
    res = {
        "config": vars(args),
        "freshness_s": {"p50": histogram_quantile(0.5, fresh, "freshrec_freshness_seconds"),
                        "p99": histogram_quantile(0.99, fresh, "freshrec_freshness_seconds"),
                        "samples": max(fresh.values()) if fresh else 0},
        "recommend_latency_ms": {"p50": float(np.percentile(lat, 50) * 1e3),
                                 "p99": float(np.percentile(lat, 99) * 1e3),
                                 "requests": len(results), "failed": failed},
        "swaps_during_load": swaps,
        "trainer_intake_events_per_s": intake,
        "machine": f"{os.cpu_count()} CPUs, no GPU",
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = [("freshness p50 / p99 (s)", f"{res['freshness_s']['p50']:.2f} / "
             f"{res['freshness_s']['p99']:.2f}", "<= 1 / 2.4"),
            ("/recommend p50 / p99 (ms)", f"{res['recommend_latency_ms']['p50']:.1f} / "
             f"{res['recommend_latency_ms']['p99']:.1f}", "<= 5 / 25"),
            ("failed requests / swaps", f"{failed} / {swaps}", "0"),
            ("trainer intake (events/s)", f"{intake:,.0f}", ">= 2,000")]
    print(f"\n{'what':<28}{'measured':>20}   budget")
    for what, got, budget in rows:
        print(f"{what:<28}{got:>20}   {budget}")
    (out / "serving.json").write_text(json.dumps(res, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].hist(lat * 1e3, bins=60)
    ax[0].set(title=f"/recommend latency, {args.items:,} items, {args.qps:g} req/s",
              xlabel="ms", ylabel="requests")
    times = [r[0] - results[0][0] for r in results]
    ax[1].plot(times, [r[3] for r in results], ".", ms=2)
    ax[1].set(title="served model_version during the load", xlabel="s", ylabel="version")
    fig.tight_layout()
    fig.savefig(out / "serving.png", dpi=110)
    print(f"\nwrote {out / 'serving.json'} and {out / 'serving.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
