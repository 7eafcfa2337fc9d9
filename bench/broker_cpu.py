"""What the embedded broker costs as its log grows: Tansu's CPU under a paced producer.

    python -m bench.broker_cpu --out bench/out [--seconds 60] [--linger 5 --linger 50]

A fresh Tansu (in-memory storage, as `freshrec up` and `freshrec bench serving` start it), a
4-partition topic, two consumer groups polling it as the features consumer and the trainer do
(kafka-python, the transport's fetch wait), and a producer sending `--rate` events/s of the
demo's shape with each `--linger` (ms) in turn, each for `--seconds` on a broker of its own.
Tansu's CPU seconds (from /proc) are read every 10 s: the cores it used in each stretch, and
over the run. Writes DIR/broker_cpu.json and DIR/broker_cpu.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BODY = b'{"user_id": "u1", "item_id": "123", "event": "click", "ts": 1.0}'


def cpu_seconds(pid: int) -> float:
    from bench.serving import task_cpu

    return task_cpu(Path(f"/proc/{pid}/stat").read_text())[1]


def run(linger_ms: int, rate: float, seconds: float, logs: Path) -> dict:
    from kafka import KafkaConsumer, KafkaProducer

    from consumers.loop import FETCH_MAX_WAIT_MS
    from freshrec.services import free_port, start_tansu
    from protocol.topics import ensure_topics

    port = free_port()
    broker = start_tansu(port, logs / f"tansu-linger{linger_ms}.log")
    bootstrap = f"127.0.0.1:{port}"
    stop = threading.Event()
    try:
        ensure_topics(bootstrap, ["t"], 4)

        def consume(group: str) -> None:
            c = KafkaConsumer("t", bootstrap_servers=bootstrap, group_id=group,
                              auto_offset_reset="earliest", enable_auto_commit=False,
                              fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
            while not stop.is_set():
                c.poll(timeout_ms=20, max_records=2000)
            c.close()

        threads = [threading.Thread(target=consume, args=(g,)) for g in ("features", "trainer")]
        for t in threads:
            t.start()
        prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, acks=1)
        t0, c0, n, marks = time.monotonic(), cpu_seconds(broker.pid), 0, []
        last = (t0, c0)
        while time.monotonic() - t0 < seconds:
            delay = t0 + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            prod.send("t", key=f"u{n % 1000}".encode(), value=BODY)
            n += 1
            if time.monotonic() - last[0] >= 10:
                now, c = time.monotonic(), cpu_seconds(broker.pid)
                marks.append({"events": n, "s": round(now - t0, 1),
                              "cores": round((c - last[1]) / (now - last[0]), 3)})
                last = (now, c)
        prod.flush()
        total = (cpu_seconds(broker.pid) - c0) / (time.monotonic() - t0)
        prod.close()
    finally:
        stop.set()
        broker.terminate()
        broker.wait(timeout=15)
    return {"linger_ms": linger_ms, "events": n, "cores": round(total, 3), "stretches": marks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--linger", type=int, action="append", help="producer linger (ms), repeatable")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "broker-logs").mkdir(parents=True, exist_ok=True)
    runs = [run(ms, args.rate, args.seconds, out / "broker-logs") for ms in args.linger or [5, 50]]
    print(f"\nTansu (in-memory) CPU, {args.rate:.0f} events/s, two consumer groups")
    print(f"{'linger':>8} {'events':>8} {'cores, whole run':>17}   cores per 10 s as the log grows")
    for r in runs:
        print(f"{r['linger_ms']:>6}ms {r['events']:>8,} {r['cores']:>17.3f}   "
              + " ".join(f"{m['cores']:.2f}" for m in r["stretches"]))
    res = {"runs": runs, "config": vars(args), "machine": f"{os.cpu_count()} CPUs",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "broker_cpu.json").write_text(json.dumps(res, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot([m["events"] for m in r["stretches"]], [m["cores"] for m in r["stretches"]],
                marker="o", label=f"linger {r['linger_ms']} ms")
    ax.set_xlabel("events in the log")
    ax.set_ylabel("Tansu CPU (cores)")
    ax.set_title(f"the embedded broker at {args.rate:.0f} events/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "broker_cpu.png", dpi=100)
    print(f"\nwrote {out / 'broker_cpu.json'} and {out / 'broker_cpu.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
