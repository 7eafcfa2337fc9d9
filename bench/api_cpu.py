"""What a request costs the API process, by route: CPU milliseconds per request at a fixed rate.

    python -m bench.api_cpu --rate 200 --out bench/out

The API as operators run it (`uvicorn service.app:app`, its own process) over a small catalog
(--items, a tiny random-initialised text encoder, a linear-tower version trained and
published by the real learner and weight store), the load from `hey` (Go, another process: it
takes no CPU from the server's Python), and the API's CPU read from /proc before and after
each route's run. So the figure is the service's own cost per request (HTTP, FastAPI, the
middleware, Redis reads, batching, the scan of a small matrix, JSON), not the catalog's: the
scan at 100k-1M items is bench/serving.py's. Routes alternate for --rounds rounds; medians.
Needs `hey` (apt-get install -y hey) and the Redis at --redis. Writes api_cpu.json and .png.

`--py-spy` also samples the API's stacks during the last /recommend round (py-spy, 200 Hz,
`--nonblocking`: it does not stop the process) into api-profile.txt (collapsed stacks) and
prints the functions that took the most of the sampled CPU, inclusive of what they call.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTES = {"/healthz": "/healthz", "/readyz": "/readyz", "/recommend": "/recommend?user_id=u1"}


def publish_version(redis_url: str, namespace: str, key: str, encoder_path: str,
                    n_items: int) -> None:
    """A catalog of `n_items`, 40 users' histories, and one version the real learner trained on
    them, signed and stored as the trainer stores its versions."""
    import redis

    from model.config import ModelConfig
    from model.encoder import TextEncoder
    from model.events import Interaction, Item
    from model.learner import OnlineLearner
    from model.serialization import to_bytes
    from protocol.features import FeatureStore
    from protocol.weights import WeightStore

    rnd = random.Random(0)
    items = [Item(f"i{k}", f"item {k} {rnd.random():.6f}", {}) for k in range(n_items)]
    events = [Interaction(f"u{rnd.randrange(40)}", rnd.choice(items).item_id, 1.7e9 + k)
              for k in range(2_000)]
    client = redis.Redis.from_url(redis_url)
    features = FeatureStore(client, namespace)
    features.upsert_items(items)
    features.apply(events)
    cfg = ModelConfig(encoder_path=encoder_path, item_tower="linear")
    learner = OnlineLearner(cfg, TextEncoder(encoder_path), device="cpu")
    learner.add_items(items)
    for start in range(0, len(events), 256):
        learner.learn(events[start: start + 256])
    WeightStore(client, key.encode(), namespace).publish(
        to_bytes(learner.state_tensors(), learner.item_ids), parent=None, kind="full",
        config=asdict(cfg), encoder=learner.encoder.identity, trained_through={})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text()
    fields = fields[fields.rindex(")") + 2:]
    user, system = fields.split()[11:13]
    return (int(user) + int(system)) / os.sysconf("SC_CLK_TCK")


def hey(url: str, rate: float, seconds: float, connections: int) -> dict[str, float]:
    """`hey` at `rate` req/s in all over `connections` connections; 2xx count and latency."""
    per = max(1, round(rate / connections))
    out = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(connections), "-q", str(per),
                          url], capture_output=True, text=True, check=True).stdout
    ok = sum(int(line.split()[1]) for line in out.splitlines()
             if line.strip().startswith("[2"))
    p50 = next(float(line.split()[2]) for line in out.splitlines() if "50% in" in line)
    p99 = next(float(line.split()[2]) for line in out.splitlines() if "99% in" in line)
    return {"ok": ok, "p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2_000)
    ap.add_argument("--rate", type=float, default=200.0, help="req/s offered (hey -q x -c)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per route and round")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--redis", default=os.environ.get("FRESHREC_REDIS_URL",
                                                      "redis://127.0.0.1:6379/0"))
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--py-spy", action="store_true",
                    help="sample the API's stacks during the last /recommend round")
    args = ap.parse_args(argv)
    spy_bin = Path(sys.executable).parent / "py-spy"
    if args.py_spy and not spy_bin.exists():
        raise SystemExit(f"--py-spy needs {spy_bin}: pip install py-spy")
    if shutil.which("hey") is None:
        raise SystemExit("needs hey: apt-get install -y hey")
    from freshrec.services import free_port
    from freshrec.tiny_encoder import make_tiny_encoder

    ns, key = f"apicpu-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    tmp = Path(tempfile.mkdtemp(prefix="api-cpu-"))
    encoder = str(make_tiny_encoder(tmp / "encoder"))
    print(f"publishing a version over {args.items:,} items ...", flush=True)
    publish_version(args.redis, ns, key, encoder, args.items)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FRESHREC_NAMESPACE": ns,
           "FRESHREC_REDIS_URL": args.redis, "FRESHREC_HMAC_KEY": key,
           "FRESHREC_ENCODER_PATH": encoder, "FRESHREC_TORCH_THREADS": "1",
           "FRESHREC_KAFKA_BOOTSTRAP": "127.0.0.1:1"}  # no Kafka: no route here writes
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:app", "--port",
                            str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                           stdout=(tmp / "api.log").open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    raw: dict[str, list[dict[str, float]]] = {route: [] for route in ROUTES}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as resp:
                    if json.loads(resp.read())["ready"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise SystemExit(f"the API did not serve a version; see {tmp / 'api.log'}")
            time.sleep(0.5)
        hey(base + ROUTES["/recommend"], args.rate, 2, args.connections)  # warm up
        args.out.mkdir(parents=True, exist_ok=True)
        for round_ in range(args.rounds):
            for route, path in ROUTES.items():
                spy = None
                if args.py_spy and route == "/recommend" and round_ == args.rounds - 1:
                    spy = subprocess.Popen(
                        [str(spy_bin), "record", "--nonblocking", "--function", "--rate", "200", "--format",
                         "raw", "--duration", str(int(args.seconds)), "--pid", str(api.pid),
                         "--output", str(args.out / "api-profile.txt")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                c0 = cpu_seconds(api.pid)
                got = hey(base + path, args.rate, args.seconds, args.connections)
                got["cpu_ms"] = 1e3 * (cpu_seconds(api.pid) - c0) / max(1, got["ok"])
                got["rps"] = got["ok"] / args.seconds
                raw[route].append(got)
                if spy is not None:
                    spy.wait(timeout=60)
    finally:
        api.terminate()
        api.wait(timeout=30)
        import redis

        client = redis.Redis.from_url(args.redis)
        for k in client.scan_iter(f"{ns}:*", count=1000):
            client.delete(k)
    summary = {route: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for route, runs in raw.items()}
    print(f"\nAPI CPU per request, {args.rate:.0f} req/s offered, {args.items:,} items, "
          f"medians of {args.rounds} rounds")
    print(f"{'route':<12}{'CPU ms/req':>12}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for route, s in summary.items():
        print(f"{route:<12}{s['cpu_ms']:>12.2f}{s['rps']:>8.0f}{s['p50_ms']:>9.1f}"
              f"{s['p99_ms']:>9.1f}")
    if args.py_spy and (args.out / "api-profile.txt").exists():
        print(f"\nwhere /recommend's sampled CPU went (inclusive), {args.out / 'api-profile.txt'}")
        for name, share in hottest(args.out / "api-profile.txt", 30):
            print(f"{100 * share:6.1f}%  {name}")
    (args.out / "api_cpu.json").write_text(json.dumps({
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                   if k != "redis"},
        "machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                  time.gmtime()),
        "summary": summary, "raw": raw}, indent=2))
    plot(summary, args.out / "api_cpu.png")
    print(f"wrote {args.out / 'api_cpu.json'} and {args.out / 'api_cpu.png'}")
    return 0


def hottest(collapsed: Path, top: int) -> list[tuple[str, float]]:
    """The `top` functions of a py-spy collapsed-stack file by their inclusive share of the
    samples (a function counted once per sample however deep it recurs)."""
    total, inclusive = 0, {}
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        for frame in set(stack.split(";")):
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return [(frame, n / max(1, total)) for frame, n in ranked]


def plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    routes = list(summary)
    ax.bar(routes, [summary[r]["cpu_ms"] for r in routes], color="#4c72b0")
    ax.set_ylabel("API CPU per request (ms)")
    ax.set_title("What a request costs the API process")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
