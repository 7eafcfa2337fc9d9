"""Serving budgets of shared/DESIGN.md and issue 8, measured on a private stack on this machine.

    freshrec bench serving --items 100000 --items 1000000 --out bench/out [--quick]
    python -m bench.serving ...                          # the same

For each `--items N`, side by side in one run: (1) the floor, a bare FastAPI process doing only
exact top-10 over an N x d matrix of the same width (bench/floor.py), under the same load; (2)
freshrec with the trainer at `--rate` events/s and `--qps` open-loop GET /recommend/s; (3)
freshrec's closed-loop max throughput with the trainer idle, same client and concurrency as
the floor's (`wrk` when installed, else a Python client). Writes DIR/serving.json (one entry
per N, each figure beside the floor's), DIR/serving.png, and prints a table.

Starts its own Tansu broker, the features consumer, the trainer (real MiniLM, `head` policy)
and the API (uvicorn, one process), in a fresh Redis namespace of the local Redis. The catalog
has `--items` items; their text features are seeded into the shared feature memo as random unit
vectors so neither the trainer nor the API spends minutes encoding 100k synthetic titles (the
latency of ranking does not depend on the values). Then, at the same time for `--seconds`:

- a producer sends `--rate` interactions/s (Zipf-popular items, 10k users) to Kafka;
- a load generator sends `--qps` GET /recommend/s open-loop (fixed schedule; asyncio over raw
  keep-alive sockets, a new connection whenever all are busy; latency from the scheduled time).

Per N, reported: freshness p50/p99 (the API's `freshrec_freshness_seconds` histogram: produce time ->
serving a version trained on it), client-side /recommend latency p50/p99 over HTTP, failed
requests, hot swaps during the run, and the trainer's intake (a second phase produces
`--burst` events as fast as possible and times the trainer through them; also through the part
of the backlog left once the producer is done, when it no longer shares the two cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
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
    # generous: at 1M items the API may still be working off the open-loop phase's backlog
    for line in httpx.get(url, timeout=120).text.splitlines():
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


def title_features(n_items: int, seed: int = 0) -> np.ndarray:
    """(n_items, 384) unit text features that are shaped like a real catalog's: each synthetic
    item is a blend of two ML-100K titles' MiniLM features (the real encoder, 1,682 titles, about
    7 s) plus noise, so items form neighbourhoods as real texts do (cosine to the nearer title
    median 0.86) instead of i.i.d. random directions, on which no ANN index beats an exact scan."""
    from freshrec.data import load_movielens, ml100k_dir
    from model.encoder import TextEncoder

    titles = TextEncoder().encode([i.text for i in load_movielens(ml100k_dir()).items])
    rng = np.random.default_rng(seed)
    out = np.empty((n_items, titles.shape[1]), dtype=np.float32)
    for start in range(0, n_items, 100_000):
        m = min(n_items, start + 100_000) - start
        a, b = rng.integers(0, len(titles), size=(2, m))
        w = rng.uniform(0.0, 0.4, size=(m, 1)).astype(np.float32)
        noise = rng.standard_normal((m, titles.shape[1])).astype(np.float32)
        noise *= 0.5 / np.sqrt(titles.shape[1])  # norm about 0.5
        v = (1 - w) * titles[a] + w * titles[b] + noise
        out[start:start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def seed_catalog(redis_url: str, namespace: str, n_items: int, features: str = "titles") -> None:
    """`n_items` synthetic items and their text features in the shared memo: blends of real
    titles' features (`title_features`) or i.i.d. random unit vectors (`random`: the worst
    case for an ANN index, what the runs before 2026-11-30 used)."""
    import redis

    from model.encoder import default_encoder_path, encoder_identity
    from model.events import Item
    from protocol.features import FeatureStore

    store = FeatureStore(redis.Redis.from_url(redis_url), namespace)
    identity = encoder_identity(default_encoder_path())
    rng = np.random.default_rng(0)
    blended = title_features(n_items) if features == "titles" else None
    for start in range(0, n_items, 5000):
        ids = [str(i) for i in range(start, min(n_items, start + 5000))]
        store.upsert_items([Item(i, f"synthetic item {i}") for i in ids])
        if blended is not None:
            vecs = blended[start:start + len(ids)]
        else:
            vecs = rng.standard_normal((len(ids), 384)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        store.put_text_features(identity, dict(zip(ids, vecs, strict=True)))


class Producer(threading.Thread):
    """Sends `rate` events/s (0 = as fast as possible) until `count` or `stop`."""

    def __init__(self, bootstrap: str, topic: str, n_items: int, rate: float, count: int) -> None:
        super().__init__(daemon=True)
        from freshrec.replay import producer

        self.p = producer(bootstrap)  # batches for 50 ms: see freshrec.replay.LINGER_MS
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
    """Open-loop GETs on a fixed schedule: latency counts from the scheduled send time.
    `results` gets (scheduled monotonic time, latency s, status, version served) per request.

    The client runs in a process of its own (`_open_loop`): in this one, the producer's thread
    (kafka-python, 500 events/s) and the CPU sampler share its GIL, and a client that stalls
    sends late, then in a burst, and both count as the server's latency."""
    import multiprocessing
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "open-loop.json"
        child = multiprocessing.get_context("spawn").Process(
            target=_open_loop, args=(base, qps, seconds, str(path)), name="open-loop")
        child.start()
        child.join(seconds + 600)
        if child.exitcode != 0:
            raise SystemExit(f"the open-loop client failed (exit code {child.exitcode})")
        results += [tuple(r) for r in json.loads(path.read_text())]


def _open_loop(base: str, qps: float, seconds: float, out: str) -> None:
    """`load`'s client, in its own process; writes its results to `out` (JSON).

    asyncio over raw keep-alive sockets (`bench.rawhttp`), not an HTTP client library in
    threads: at 200 req/s 16 httpx threads took a sizeable share of the two cores the server
    under test runs on (the benchmark's process, with its producer, 45% of a core at 1M items).
    A request that finds every open connection busy opens another (open loop: a slow server
    gets more concurrent requests, never fewer), up to MAX_CONNECTIONS; past that, requests
    wait for a connection, their latency still counted from the scheduled time.

    One dispatcher starts each request at its time; only requests in flight exist as tasks.
    (It used to create every request's task up front, each sleeping until its time: 12,000 of
    them took the client over half a second of a core on the busy machine, and the first
    requests, sent late, counted that as the server's latency; bench/RESULTS.md, "Issue 8,
    session 11".)"""
    import asyncio

    from bench.rawhttp import KeepAlivePool, model_version

    rng = random.Random(3)
    users = [f"u{rng.randrange(10_000)}" for _ in range(int(qps * seconds))]
    results: list = []

    async def run() -> None:
        pool = KeepAlivePool(base, MAX_CONNECTIONS)
        running: set[asyncio.Task] = set()

        async def one(scheduled: float, user: str) -> None:
            status, body = await pool.get(f"/recommend?user_id={user}&k=10")
            results.append((scheduled, time.monotonic() - scheduled, status,
                            model_version(body)))

        start = time.monotonic() + 0.1
        for n, user in enumerate(users):
            scheduled = start + n / qps
            if (wait := scheduled - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(one(scheduled, user))  # late: sent now, counted from
            running.add(task)  # its scheduled time
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)
        pool.close()

    asyncio.run(run())
    Path(out).write_text(json.dumps(results))


MAX_CONNECTIONS = 2048


LUA = """request = function()
  return wrk.format("GET", "/recommend?k=10&user_id=u" .. math.random(0, 9999))
end
"""


def drained(base: str, limit_s: float = 300.0) -> float:
    """Wait until one GET /recommend is answered within a second: the requests an open-loop
    phase left queued in the server (its client gave up on them) must not be what a closed-loop
    phase measures (the floor at 1M items took minutes to finish them, and wrk timed out on
    every request). Returns the seconds waited."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        t = time.monotonic()
        try:
            httpx.get(f"{base}/recommend", params={"user_id": "u1", "k": 10}, timeout=limit_s)
        except httpx.HTTPError:
            pass
        if time.monotonic() - t < 1.0:
            break
    return time.monotonic() - t0


def closed_loop(base: str, seconds: float, connections: int, out: Path) -> dict[str, float]:
    """Max throughput: `connections` clients back to back for `seconds` (wrk when installed:
    its C client costs the server's two cores little; else Python threads)."""
    import shutil

    drained(base)
    if shutil.which("wrk"):
        script = out / "recommend.lua"
        script.write_text(LUA)
        res = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s",
                              "--timeout", "10s", "--latency", "-s", str(script), base],
                             capture_output=True,
                             text=True, timeout=seconds + 60)
        text = res.stdout
        rps = float(text.split("Requests/sec:")[1].split()[0])
        errors = 0
        for line in text.splitlines():
            if "Non-2xx" in line or "Socket errors" in line:
                errors += sum(int(x.strip(",")) for x in line.split() if x.strip(",").isdigit())
        return {"rps": rps, "errors": float(errors), "client": 0.0}
    import httpx

    stop, count, errs = time.monotonic() + seconds, [0], [0]

    def worker() -> None:
        rng = random.Random()
        with httpx.Client(base_url=base, timeout=10) as c:
            while time.monotonic() < stop:
                r = c.get("/recommend", params={"user_id": f"u{rng.randrange(10_000)}", "k": 10})
                count[0] += 1
                errs[0] += r.status_code != 200

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rps": count[0] / seconds, "errors": float(errs[0]), "client": 1.0}


def nicer(pid: int, nice: int) -> None:
    """Lower every thread of process `pid` `nice` steps (Linux keeps a nice value per thread;
    threads it starts later inherit their creator's)."""
    from protocol.runtime import lower_priority

    if not nice:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        lower_priority(int(task.name), nice)  # False: the thread ended


def task_cpu(stat: str) -> tuple[str, float]:
    """(name, CPU seconds used) of a process or thread from its /proc/.../stat line."""
    fields = stat[stat.rindex(")") + 2:].split()
    return (stat[stat.index("(") + 1: stat.rindex(")")],
            (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))


class CpuSampler(threading.Thread):
    """CPU seconds each thread of `pids` (name -> pid) used per `every` s, read from /proc: who
    held the two cores while the open loop ran (a diagnostic written beside the timeline)."""

    def __init__(self, pids: dict[str, int], every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.stop = threading.Event()
        self.samples: list[tuple[float, dict[str, float]]] = []

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for child in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
            try:  # the open-loop client, once spawned (not a finished child not yet reaped)
                if b"multiprocessing" in Path(f"/proc/{child}/cmdline").read_bytes():
                    self.pids["client"] = int(child)
            except OSError:
                pass
        for name, pid in self.pids.items():
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    comm, seconds = task_cpu((task / "stat").read_text())
                except OSError:
                    continue  # the thread ended
                key = f"{name}/{comm}"
                out[key] = out.get(key, 0.0) + seconds
        return out

    def cores(self) -> dict[str, float]:
        """Mean cores each process (threads summed) used over the samples, most first."""
        if len(self.samples) < 2:
            return {}
        span = self.samples[-1][0] - self.samples[0][0] + self.every
        used: dict[str, float] = {}
        for _, sample in self.samples:
            for key, seconds in sample.items():
                used[key.split("/")[0]] = used.get(key.split("/")[0], 0.0) + seconds
        return {k: round(v / span, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1])}

    def run(self) -> None:
        last = self._read()
        while not self.stop.wait(self.every):
            now = self._read()
            self.samples.append((round(time.time(), 3), {
                k: round(v - last.get(k, 0.0), 3) for k, v in now.items()
                if v - last.get(k, 0.0) > 0}))
            last = now


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_http(url: str, seconds: float) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def latency(results: list) -> dict[str, float]:
    lat = np.array([r[1] for r in results]) if results else np.array([float("nan")])
    return {"p50": float(np.percentile(lat, 50) * 1e3), "p99": float(np.percentile(lat, 99) * 1e3),
            "requests": len(results), "failed": sum(1 for r in results if r[2] != 200)}


def dtype_recall(n: int, width: int, dtype: str, queries: int = 100) -> float:
    """recall@10 of top-10 over the matrix stored as `dtype` against fp32 exact (random rows,
    like the benchmark's catalog)."""
    import torch

    from model import quant

    if dtype == "fp32":
        return 1.0
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, width, generator=gen)
    q = torch.randn(queries, width, generator=gen)
    want = (q @ x.T).topk(10).indices
    got = quant.scores(q, quant.encode(x, dtype), dtype).topk(10).indices
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(want, got, strict=True))
    return hits / (10 * queries)


def run_floor(n: int, width: int, args: argparse.Namespace, logs: Path) -> dict:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLOOR_ITEMS": str(n), "FLOOR_DIM": str(width),
           "FRESHREC_TORCH_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.floor:app", "--port",
                             str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                            stdout=(logs / f"floor-{n}.log").open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", 300)
        results: list = []
        load(base, args.qps, args.seconds, results)
        closed = closed_loop(base, args.closed_seconds, args.connections, logs)
        return {"recommend_ms": latency(results), "max_rps": closed["rps"],
                "closed_errors": closed["errors"], "rss_mb": rss_mb(proc.pid)}
    finally:
        proc.terminate()  # uvicorn finishes the requests still queued first: at 1M items, minutes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_freshrec(n: int, args: argparse.Namespace, logs: Path) -> dict:
    from freshrec.services import start_tansu

    ns = f"bench-{uuid.uuid4().hex[:8]}"
    kport, aport, tport = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "FRESHREC_NAMESPACE": ns,
           "FRESHREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{kport}", "FRESHREC_REDIS_URL": args.redis,
           "FRESHREC_HMAC_KEY": uuid.uuid4().hex, "FRESHREC_TRAINER_METRICS_PORT": str(tport),
           "FRESHREC_FEATURES_METRICS_PORT": "0", "FRESHREC_DEVICE": "cpu",
           "FRESHREC_ITEM_TOWER": args.item_tower, "FRESHREC_ITEM_DTYPE": args.dtype,
           "FRESHREC_ANN_MIN_ITEMS": str(args.ann_min_items), "FRESHREC_LOG_LEVEL": "INFO",
           "FRESHREC_ANN_REBUILD_S": str(args.ann_rebuild_s),
           "FRESHREC_ANN_MONITOR_S": str(args.ann_monitor_s),
           # two cores: one for the trainer's torch, one for the API (it uses one thread)
           "FRESHREC_TORCH_THREADS": os.environ.get("FRESHREC_TORCH_THREADS", "1")}
    procs = [start_tansu(kport, logs / "tansu.log")]
    nicer(procs[0].pid, args.nice)
    from protocol.topics import ensure_topics

    ensure_topics(env["FRESHREC_KAFKA_BOOTSTRAP"], ["freshrec.interactions", "freshrec.items",
                                                    "freshrec.dlq"], 4)
    t0 = time.monotonic()
    print(f"seeding {n:,} items ...", flush=True)
    seed_catalog(args.redis, ns, n, args.features)
    api = None
    for name, argv_ in [("features", ["-m", "consumers.features"]),
                        ("trainer", ["-m", "consumers.trainer"]),
                        ("api", ["-m", "uvicorn", "service.app:app", "--port", str(aport),
                                 "--log-level", "warning"])]:
        proc = subprocess.Popen([sys.executable, *argv_], env=env, cwd=ROOT,
                                stdout=(logs / f"{name}-{n}.log").open("wb"),
                                stderr=subprocess.STDOUT)
        if name != "api":
            nicer(proc.pid, args.nice)
        procs.append(proc)
        api = proc if name == "api" else api
    assert api is not None
    base = f"http://127.0.0.1:{aport}"
    import httpx

    try:
        warm = Producer(env["FRESHREC_KAFKA_BOOTSTRAP"], "freshrec.interactions", n,
                        args.rate, 10**9)
        warm.start()
        # until a version over the whole catalog is served and, above --ann-min-items, the ANN
        # index has been built twice (the first one on the first, barely trained version; the
        # next one twice its build's time or --ann-rebuild-s later, whichever comes first) and
        # is attached or refused
        builds = 2 if args.ann_min_items and n >= args.ann_min_items else 0
        while True:
            try:
                m = httpx.get(f"{base}/model", timeout=2).json()
                ann = httpx.get(f"{base}/status", timeout=2).json().get("retrieval") or {}
                if m["version"] > 0 and m["catalog_items"] >= n and not ann.get("ann_building") \
                        and ann.get("ann_builds", 0) >= builds:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > args.ready_s:
                raise SystemExit("stack did not serve a version in time; see logs")
            time.sleep(1)
        ready_s = time.monotonic() - t0
        print(f"stack ready in {ready_s:.0f} s; measuring {args.seconds:.0f} s", flush=True)
        time.sleep(min(10.0, args.seconds / 3))  # past the first builds
        before = _metrics(f"{base}/metrics")
        swaps0 = httpx.get(f"{base}/model", timeout=120).json()["swaps"]
        results: list = []
        recall0 = httpx.get(f"{base}/status", timeout=120).json().get("retrieval") or {}
        wall = time.time() - time.monotonic()  # monotonic -> wall clock, to match the logs
        redis_pid = subprocess.run(["pgrep", "-o", "-x", "redis-server"], capture_output=True,
                                   text=True).stdout.split()
        sampler = CpuSampler({"broker": procs[0].pid, "features": procs[1].pid,
                              "trainer": procs[2].pid, "api": api.pid, "bench": os.getpid(),
                              **({"redis": int(redis_pid[0])} if redis_pid else {})})
        sampler.start()
        spy = None
        if args.py_spy:  # what the API's threads spend their CPU on during the open loop
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking",
                 "--threads", "--rate", "200", "--format", "raw", "--duration",
                 str(int(args.seconds)), "--pid", str(api.pid), "--output",
                 str(logs / f"api-profile-{n}.txt")],
                stdout=subprocess.DEVNULL, stderr=(logs / "py-spy.log").open("wb"))
        load(base, args.qps, args.seconds, results)
        if spy is not None:
            spy.wait(timeout=60)
        sampler.stop.set()
        sampler.join()
        (logs / f"cpu-{n}.json").write_text(json.dumps(sampler.samples))
        # every request: wall-clock scheduled time, latency (ms), status, version served
        (logs / f"open-loop-{n}.json").write_text(json.dumps(
            [(round(r[0] + wall, 4), round(r[1] * 1e3, 2), r[2], r[3]) for r in results]))
        recall1 = httpx.get(f"{base}/status", timeout=120).json().get("retrieval") or {}
        after = _metrics(f"{base}/metrics")
        (logs / f"api-metrics-{n}.txt").write_text(  # the run's counters, for whoever digs
            httpx.get(f"{base}/metrics", timeout=120).text)
        swaps = httpx.get(f"{base}/model", timeout=120).json()["swaps"] - swaps0
        rss = rss_mb(api.pid)
        warm.stop.set()
        warm.join()

        def delta(name: str) -> dict[str, float]:
            return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(name)}

        fresh = delta("freshrec_freshness_seconds_bucket")
        handled = {k: v for k, v in delta("freshrec_http_request_duration_seconds_bucket").items()
                   if 'route="/recommend"' in k and 'method="GET"' in k and 'status="200"' in k}
        swap = delta("freshrec_swap_delay_seconds_bucket")
        # closed loop, trainer idle (its backlog drained first)
        tm = f"http://127.0.0.1:{tport}/metrics"

        def trained() -> float | None:  # None once the trainer has exited
            try:  # trained or set aside for its gate: every interaction it took in
                m = _metrics(tm)
                return m["freshrec_trainer_events_total"] + \
                    m["freshrec_trainer_held_out_events_total"]
            except (httpx.HTTPError, KeyError):
                return None

        drain0 = time.monotonic()
        while time.monotonic() - drain0 < args.drain_s:  # a starved trainer may never catch up
            e = trained()
            time.sleep(2)
            if e is None or trained() == e:
                break
        closed = closed_loop(base, args.closed_seconds, args.connections, logs)
        served = httpx.get(f"{base}/status", timeout=120).json().get("retrieval") or {}
        # intake: `--burst` events produced as fast as possible, timed through the trainer's
        # own counter; also once the producer is done (the rest of the backlog): on two cores
        # the benchmark's own producer takes a large share of the CPU while it runs
        intake = drain = produce_rate = float("nan")
        intake_cpu: dict[str, float] = {}
        e0 = trained()
        if e0 is not None:
            burst_cpu = CpuSampler(dict(sampler.pids))
            burst_cpu.start()
            burst = Producer(env["FRESHREC_KAFKA_BOOTSTRAP"], "freshrec.interactions", n, 0,
                             args.burst)
            b0 = time.monotonic()
            burst.start()
            done, produced_at = 0.0, None
            while time.monotonic() - b0 < 300:
                now = trained()
                if now is None:
                    break
                done = now - e0
                if produced_at is None and not burst.is_alive():
                    produced_at = (time.monotonic(), done)
                if done >= args.burst:
                    break
                time.sleep(0.2)
            end = time.monotonic()
            burst_cpu.stop.set()
            burst_cpu.join()
            intake_cpu = burst_cpu.cores()
            (logs / f"cpu-intake-{n}.json").write_text(json.dumps(burst_cpu.samples))
            intake = done / (end - b0)
            if produced_at is not None:  # the burst's own pace: the intake cannot outrun it
                produce_rate = args.burst / (produced_at[0] - b0)
            if produced_at is not None and done - produced_at[1] >= args.burst / 5:
                drain = (done - produced_at[1]) / (end - produced_at[0])
        trainer_exit = procs[2].poll()
        if trainer_exit is not None:
            print(f"the trainer exited ({trainer_exit}) during the run; see its log", flush=True)
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

    def q(hist: dict[str, float], name: str, quantile: float, scale: float = 1.0) -> float:
        return histogram_quantile(quantile, hist, name) * scale

    parts = swap_quantiles(swap_log(logs / f"api-{n}.log", results[0][0] + wall,
                                    results[-1][0] + wall)) if results else {}

    return {"freshness_s": {"p50": q(fresh, "freshrec_freshness_seconds", 0.5),
                            "p99": q(fresh, "freshrec_freshness_seconds", 0.99),
                            "samples": max(fresh.values()) if fresh else 0},
            "recommend_ms": latency(results), "swaps": swaps,
            # inside the API, from its middleware's histogram (coarse buckets): what the client
            # saw beyond this waited in a socket, a queue or for a core
            "recommend_server_ms": {
                "p50": q(handled, "freshrec_http_request_duration_seconds", 0.5, 1e3),
                "p99": q(handled, "freshrec_http_request_duration_seconds", 0.99, 1e3)},
            # exact, from the API's log lines of the swaps in the open loop; the histogram's
            # estimate beside it (interpolated inside a bucket)
            "swap_ms": parts.get("delay") or {
                "p50": q(swap, "freshrec_swap_delay_seconds", 0.5, 1e3),
                "p99": q(swap, "freshrec_swap_delay_seconds", 0.99, 1e3)},
            "swap_ms_histogram": {"p50": q(swap, "freshrec_swap_delay_seconds", 0.5, 1e3),
                                  "p99": q(swap, "freshrec_swap_delay_seconds", 0.99, 1e3)},
            "swap_parts_ms": {k: v for k, v in parts.items() if k not in ("delay", "rows")},
            "swap_rows": parts.get("rows"),  # item rows a swap wrote (its build, its index)
            "trainer_events_per_s": intake, "trainer_drain_events_per_s": drain,
            "burst_produced_events_per_s": produce_rate, "max_rps": closed["rps"],
            "closed_errors": closed["errors"], "api_rss_mb": rss, "ready_s": ready_s,
            "trainer_exit": trainer_exit, "served_retrieval": served,
            # mean cores per process (threads summed, /proc): in the open loop, and while the
            # trainer took in the burst
            "cpu_cores": {"open_loop": sampler.cores(), "intake": intake_cpu},
            "served_recall": served_recall(recall0, recall1),
            "timeline": [(r[0] - results[0][0], r[1], r[3]) for r in results[::5]]}


SWAP_LINE = re.compile(r"^(\S+ \S+) freshrec\.service serving version (\d+), ([\d.]+) ms after "
                       r"it was stored \((.*) ms; (?:(\d+) rows|full build)\)$")


def swap_log(path: Path, start: float, end: float) -> list[dict[str, float]]:
    """The API's swaps between wall-clock times `start` and `end`, from its INFO log (exact,
    where the histogram only tells the bucket): the delay from the store and its parts (ms):
    before the loader read the pointer, its checks up to loading, load, build, index; and
    the item rows it wrote (`rows`; absent for a full build)."""
    swaps = []
    for line in path.read_text(errors="replace").splitlines():
        m = SWAP_LINE.match(line)
        if m is None:
            continue
        at = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if start <= at <= end:
            parts = dict(part.rsplit(" ", 1) for part in m[4].split(", ") if " " in part)
            swaps.append({"delay": float(m[3]), **{k: float(v) for k, v in parts.items()},
                          **({"rows": float(m[5])} if m[5] is not None else {})})
    return swaps


def swap_quantiles(swaps: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50 / p99 of the delay and of each of its parts (ms) over `swaps`."""
    keys = dict.fromkeys(k for s in swaps for k in s)
    return {k: {"p50": float(np.percentile([s[k] for s in swaps if k in s], 50)),
                "p99": float(np.percentile([s[k] for s in swaps if k in s], 99))} for k in keys}


def served_recall(before: dict, after: dict) -> dict[str, float | int | None]:
    """recall@10 of what the API served during the open loop, from its recall monitor's counts
    (`/status`: queries requests searched the ANN index with, measured against the exact scan
    of the served version); 1.0 for exact serving."""
    if after.get("retrieval") != "ann":
        return {"recall@10": 1.0 if after.get("retrieval") == "exact" else None, "queries": 0}
    asked = after.get("served_recall_asked", 0) - before.get("served_recall_asked", 0)
    hits = after.get("served_recall_hits", 0) - before.get("served_recall_hits", 0)
    return {"recall@10": hits / asked if asked else None, "queries": asked // 10}


def main(argv: list[str] | None = None) -> int:
    from service.settings import ServiceSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--items", type=int, action="append", help="catalog size (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a short run (15 s phases)")
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--qps", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--closed-seconds", type=float, default=20)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--burst", type=int, default=40_000)
    ap.add_argument("--item-tower", default="linear", choices=["linear", "mlp"])
    ap.add_argument("--dtype", default=os.environ.get("FRESHREC_ITEM_DTYPE", "fp32"),
                    choices=["fp32", "fp16", "int8"])
    ap.add_argument("--ann-min-items", type=int,
                    default=int(os.environ.get("FRESHREC_ANN_MIN_ITEMS", ServiceSettings.model_fields[
                        "ann_min_items"].default)),
                    help="the API's FRESHREC_ANN_MIN_ITEMS (0: exact top-k)")
    ap.add_argument("--features", default="titles", choices=["titles", "random"],
                    help="synthetic items' text features: blends of real titles' (default) or "
                         "i.i.d. random unit vectors")
    ap.add_argument("--ann-rebuild-s", type=float, default=60.0,
                    help="the API's FRESHREC_ANN_REBUILD_S; the run measures after the second build")
    ap.add_argument("--ann-monitor-s", type=float, default=5.0,
                    help="the API's FRESHREC_ANN_MONITOR_S: 8 served queries' recall measured "
                         "this often (default 10 s in production; 5 s here: ~96 queries in a "
                         "60 s open loop, one exact scan of 8 queries every 5 s)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the trainer, the features consumer and the broker this many steps "
                         "nicer than the API (0: all alike)")
    ap.add_argument("--py-spy", action="store_true",
                    help="record the API's stacks (py-spy, --nonblocking, 200 Hz) during the "
                         "open loop into DIR/serving-logs/api-profile-N.txt (collapsed stacks)")
    ap.add_argument("--ready-s", type=float, default=1200)
    ap.add_argument("--drain-s", type=float, default=60,
                    help="at most this long waiting for the trainer's backlog before max rps")
    ap.add_argument("--redis", default=os.environ.get("FRESHREC_REDIS_URL",
                                                      "redis://127.0.0.1:6379/0"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.closed_seconds, args.burst = 15, 10, 5000
    sizes = args.items or [100_000]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "serving-logs"
    logs.mkdir(exist_ok=True)
    from model.config import ModelConfig

    cfg = ModelConfig(item_tower=args.item_tower)
    width = cfg.base_dim + 1 + cfg.dim if args.item_tower == "linear" else cfg.dim
    runs = []
    for n in sizes:
        print(f"== {n:,} items: the floor", flush=True)
        floor = run_floor(n, width, args, logs)
        print(f"   floor: max {floor['max_rps']:.0f} req/s, p99 "
              f"{floor['recommend_ms']['p99']:.1f} ms; now freshrec", flush=True)
        fr = run_freshrec(n, args, logs)
        served = fr["served_retrieval"]  # what the API says it served with (GET /status)
        kind = served.get("retrieval", "exact")
        # ANN: measured on the queries it served during the open loop (the tuned figure too)
        recall = fr["served_recall"]["recall@10"] if kind == "ann" else \
            dtype_recall(n, width, args.dtype)
        run = {"items": n, **{k: v for k, v in fr.items() if k != "timeline"},
               "failed": fr["recommend_ms"]["failed"],
               "floor_max_rps": floor["max_rps"], "floor_recommend_ms": floor["recommend_ms"],
               "floor_rss_mb": floor["rss_mb"],
               "recall@10": recall, "retrieval": kind, "dtype": served.get("dtype", args.dtype),
               "tuned_recall@10": served.get("recall@10"),
               "vs_floor": {"max_rps": fr["max_rps"] / floor["max_rps"],
                            "recommend_p50": fr["recommend_ms"]["p50"] /
                            floor["recommend_ms"]["p50"],
                            "recommend_p99": fr["recommend_ms"]["p99"] /
                            floor["recommend_ms"]["p99"],
                            "rss": fr["api_rss_mb"] / floor["rss_mb"]}}
        runs.append((run, fr["timeline"]))
        report([r for r, _ in runs], out, args)
    plot(runs, out)
    print(f"\nwrote {out / 'serving.json'} and {out / 'serving.png'}")
    return 0


def report(runs: list[dict], out: Path, args: argparse.Namespace) -> None:
    res = {"runs": runs, "config": {k: v for k, v in vars(args).items() if k != "redis"},
           "machine": f"{os.cpu_count()} CPUs, no GPU, load average "
                      f"{os.getloadavg()[0]:.1f} at the end",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "serving.json").write_text(json.dumps(res, indent=2))
    for run in runs:
        fl = run["floor_recommend_ms"]
        rows = [("freshness p50 / p99 (s)", f"{run['freshness_s']['p50']:.2f} / "
                 f"{run['freshness_s']['p99']:.2f}", "-", "<= 1 / 2.4"),
                ("/recommend p50 / p99 (ms)", f"{run['recommend_ms']['p50']:.1f} / "
                 f"{run['recommend_ms']['p99']:.1f}", f"{fl['p50']:.1f} / {fl['p99']:.1f}",
                 "p99 <= 25"),
                ("  inside the API p50 / p99 (ms)", _pair(run.get("recommend_server_ms")), "-",
                 ""),
                ("failed requests / swaps", f"{run['failed']} / {run['swaps']}", "-", "0"),
                ("version in Redis -> served p50 / p99 (ms)", f"{run['swap_ms']['p50']:.0f} / "
                 f"{run['swap_ms']['p99']:.0f}", "-", "<= 50 (100k), 100 (1M)"),
                *((f"  {part} p50 / p99 (ms)", _pair(q), "-", "")
                  for part, q in run.get("swap_parts_ms", {}).items()),
                ("  item rows written p50 / p99", _pair(run.get("swap_rows")), "-", ""),
                ("trainer intake (events/s)", f"{run['trainer_events_per_s']:,.0f}", "-",
                 ">= 5,000"),
                ("  the backlog once produced (events/s)",
                 f"{run.get('trainer_drain_events_per_s', float('nan')):,.0f}", "-", ""),
                ("  the burst produced at (events/s)",
                 f"{run.get('burst_produced_events_per_s', float('nan')):,.0f}", "-", ""),
                ("max throughput (req/s)", f"{run['max_rps']:.0f}", f"{run['floor_max_rps']:.0f}",
                 ">= 1.0x floor"),
                ("API RSS (MB)", f"{run['api_rss_mb']:.0f}", f"{run['floor_rss_mb']:.0f}", "-"),
                ("recall@10 served (queries measured)", f"{_num(run.get('recall@10'))} "
                 f"({run.get('served_recall', {}).get('queries', 0)})", "1", ">= 0.95"),
                *((f"cores in use, {phase.replace('_', ' ')}", _cores(used), "-", "of 2")
                  for phase, used in run.get("cpu_cores", {}).items() if used)]
        print(f"\n{run['items']:,} items ({run['retrieval']}, {run['dtype']})")
        print(f"{'what':<42}{'freshrec':>20}{'floor':>20}   goal")
        for what, got, floor, goal in rows:
            print(f"{what:<42}{got:>20}{floor:>20}   {goal}")


def _cores(used: dict[str, float]) -> str:
    """'1.36: api 0.55, trainer 0.33, ...' (the four largest)."""
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(used.items())[:4])
    return f"{sum(used.values()):.2f}: {top}"


def _pair(q: dict | None) -> str:
    return "-" if not q else f"{q['p50']:.1f} / {q['p99']:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(runs: list[tuple[dict, list]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    labels = [f"{r['items']:,}" for r, _ in runs]
    x = np.arange(len(runs))
    ax[0].bar(x - 0.2, [r["max_rps"] for r, _ in runs], 0.4, label="freshrec")
    ax[0].bar(x + 0.2, [r["floor_max_rps"] for r, _ in runs], 0.4, label="bare FastAPI floor")
    ax[0].set(xticks=x, xticklabels=labels, xlabel="catalog items", ylabel="req/s",
              title="closed-loop max throughput")
    ax[0].legend()
    ax[1].bar(x - 0.2, [r["recommend_ms"]["p99"] for r, _ in runs], 0.4, label="freshrec")
    ax[1].bar(x + 0.2, [r["floor_recommend_ms"]["p99"] for r, _ in runs], 0.4, label="floor")
    ax[1].axhline(25, color="k", ls="--", lw=0.8)
    ax[1].set(xticks=x, xticklabels=labels, yscale="log", ylabel="ms",
              title="/recommend p99 at the open-loop rate")
    ax[1].legend()
    for (r, timeline) in runs:
        ax[2].plot([t[0] for t in timeline], [t[1] * 1e3 for t in timeline], ".", ms=2,
                   label=f"{r['items']:,}")
    ax[2].set(yscale="log", xlabel="s", ylabel="ms", title="latency over the run (trainer on)")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(out / "serving.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
