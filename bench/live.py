"""`freshrec bench live`: the stream replayed through the real stack over HTTP, scored as users see it.

For each event rate, on a fresh stack (Tansu broker, a private Redis namespace, the features
consumer, the trainer and the API, each its own process, started as `freshrec up` starts them):

1. the catalog goes in through `POST /items`, the warm-up half of the stream through
   `POST /events` as fast as the API takes it; then the bench waits until a served version was
   trained through every warm-up event;
2. the next events are replayed at the rate: for a scored event, `GET /recommend` for its user
   (history from the features store, seen items excluded) and the event's item is scored (HR@10,
   NDCG@10); then the event is sent with `POST /events`. "short history" counts rankings whose
   `history_used` was below the user's events so far (capped at the user tower's 20): the
   features store had not applied the user's newest event yet. Each scored event is also ranked
   by `POST /recommend` with the user's exact history and seen items ("live, exact history"):
   the served model without the features store's lag. A client on this 2-core machine cannot
   ask for 1,000 rankings a second beside the whole stack, so above `--max-get-rate` only every
   s-th event is scored (s = ceil(rate / max-get-rate)); every event is still sent;
3. the same events, in the same order, run through the offline benchmark (`bench.quality`) with
   the live trainer's batching at the same rate: `incremental` (learns) and `static` (frozen after
   the same warm-up). Offline figures are taken on exactly the scored events.

Events are in time order with each user's same-second events ordered by a seeded hash
(`freshrec.data.hash_ties`): the canonical id order leaks the next item.
``python -m bench.live --out DIR`` writes DIR/live.json and DIR/live.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from bench.stack import BenchStack
from bench.stats import paired_ratio_ci
from freshrec.data import Dataset, Interaction, hash_ties, load_movielens, ml100k_dir

K = 10
HISTORY_LEN = 20  # the user tower's window (ModelConfig.history_len): what history_used counts
SEND_EVERY_S = 0.025  # the client batches its POST /events: fewer requests for the API to parse


def _metrics(client: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _quantile_between(q: float, before: dict[str, float], after: dict[str, float],
                      name: str) -> float | None:
    """q-quantile of a Prometheus histogram over what it observed between two scrapes."""
    from bench.serving import histogram_quantile

    diff = {k: v - before.get(k, 0.0) for k, v in after.items() if k.startswith(name + "_bucket")}
    value = histogram_quantile(q, diff, name)
    return None if math.isnan(value) else value


def _event_body(e: Interaction) -> dict[str, Any]:
    return {"user_id": e.user_id, "item_id": e.item_id, "event": e.event, "ts": e.ts}


def _post(client: httpx.Client, path: str, body: list[dict[str, Any]], token: str) -> None:
    for attempt in range(50):  # the API answers 503 until its Kafka producer connects
        r = client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
        if r.status_code == 202:
            return
        if r.status_code != 503 or attempt == 49:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:200]}")
        time.sleep(0.2)


def _trained_events(client: httpx.Client, topic: str) -> int:
    offsets = client.get("/model").json().get("trained_through", {}).get("offsets", {})
    return sum(v for k, v in offsets.items() if k.rpartition(":")[0] == topic)


def _wait(what: str, predicate: Any, timeout_s: float, stack: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        stack.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)


def replay_live(ds: Dataset, events: Sequence[Interaction], n_warm: int, rate: float,
                stride: int, home: Path, redis_url: str) -> dict[str, Any]:
    """Warm up over HTTP, then replay `events[n_warm:]` at `rate`, scoring every stride-th."""
    live = BenchStack(home, redis_url)
    topic = "freshrec.interactions"
    try:
        with httpx.Client(base_url=live.base, timeout=10) as client:
            _wait("the API", lambda: _ok(client, "/healthz"), 120, live.stack)
            items = [{**it.fields, "item_id": it.item_id, "text": it.text} for it in ds.items]
            for s in range(0, len(items), 1000):
                _post(client, "/items", items[s:s + 1000], live.token)
            t0 = time.monotonic()
            warm = events[:n_warm]
            for s in range(0, len(warm), 1000):
                _post(client, "/events", [_event_body(e) for e in warm[s:s + 1000]], live.token)
            _wait("the trainer to learn the warm-up", lambda: _trained_events(client, topic)
                  >= n_warm, 600, live.stack)
            warm_s = time.monotonic() - t0
            time.sleep(2.0)  # the features consumer is milliseconds behind; be generous
            before = _metrics(client)
            result = _replay(live.base, events[:n_warm], events[n_warm:], rate, stride,
                             live.token)
            time.sleep(1.0)
            after = _metrics(client)
            result.update(
                warmup_s=warm_s,
                freshness_s={q: _quantile_between(v, before, after, "freshrec_freshness_seconds")
                             for q, v in (("p50", 0.5), ("p99", 0.99))},
                served_versions=int(after.get("freshrec_model_swaps_total", 0)
                                    - before.get("freshrec_model_swaps_total", 0)),
            )
            return result
    finally:
        live.close()


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _replay(base: str, warm: Sequence[Interaction], stream: Sequence[Interaction], rate: float,
            stride: int, token: str) -> dict[str, Any]:
    """Paced replay: event i is due at i / rate. A scored event's ranking is asked for when it is
    due, and the event is sent once the answer is in; each user's events are sent in order, and
    what is ready goes out as one `POST /events` every 25 ms (so a slow ranking delays only its
    own user, and the client keeps the pace at 1,000 events/s)."""
    return asyncio.run(_replay_async(base, warm, stream, rate, stride, token))


async def _replay_async(base: str, warm: Sequence[Interaction], stream: Sequence[Interaction],
                        rate: float, stride: int, token: str) -> dict[str, Any]:
    hits: dict[int, tuple[float, float]] = {}
    exact: dict[int, tuple[float, float]] = {}  # the same served model, given the exact history
    versions: set[int] = set()
    latencies: list[float] = []
    errors = [0]
    short_history = [0]
    # every user's exact history and seen items before each scored event
    items: dict[str, list[str]] = {}
    for e in warm:
        items.setdefault(e.user_id, []).append(e.item_id)
    truth: dict[int, list[str]] = {}
    for i, e in enumerate(stream):
        if i % stride == 0:
            truth[i] = list(items.get(e.user_id, ()))
        items.setdefault(e.user_id, []).append(e.item_id)
    ready: list[tuple[dict[str, Any], asyncio.Future[None]]] = []  # (event, its `sent`)
    # per user, the newest event's (queued, sent) futures: a user's events are queued in order,
    # and a ranking is asked for only once the user's previous event was accepted (202)
    last_of_user: dict[str, tuple[asyncio.Future[None], asyncio.Future[None]]] = {}
    headers = {"Authorization": f"Bearer {token}"}
    done = asyncio.Event()

    async with httpx.AsyncClient(base_url=base, timeout=10,
                                 limits=httpx.Limits(max_connections=64)) as client:

        async def score(i: int, e: Interaction) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.get("/recommend", params={"user_id": e.user_id, "k": K})
            except httpx.HTTPError:
                r = None
            latencies.append(time.perf_counter() - t0)
            if r is None or r.status_code != 200:
                errors[0] += 1
                hits[i] = (0.0, 0.0)
                return
            body = r.json()
            hits[i] = _hit(body, e.item_id)
            versions.add(int(body["model_version"]))
            past = truth[i]
            if body.get("history_used", 0) < min(HISTORY_LEN, len(past)):
                short_history[0] += 1  # the user's newest events were not in the features yet
            r = await client.post("/recommend", json={
                "history": past[-50:], "k": K, "exclude": sorted(set(past))[:1000]})
            exact[i] = _hit(r.json(), e.item_id) if r.status_code == 200 else (0.0, 0.0)

        async def handle(i: int, e: Interaction,
                         before: tuple[asyncio.Future[None], asyncio.Future[None]] | None,
                         mine: tuple[asyncio.Future[None], asyncio.Future[None]]) -> None:
            if i % stride == 0:
                if before is not None:
                    await before[1]
                await score(i, e)
            if before is not None:
                await before[0]
            ready.append((_event_body(e), mine[1]))
            mine[0].set_result(None)

        async def sender() -> None:
            while not (done.is_set() and not ready):
                await asyncio.sleep(SEND_EVERY_S)
                while ready:
                    batch = ready[:1000]
                    del ready[:1000]
                    r = await client.post("/events", json=[b for b, _ in batch],
                                          headers=headers)
                    if r.status_code != 202:
                        raise RuntimeError(f"POST /events: {r.status_code} {r.text[:200]}")
                    for _, sent in batch:
                        sent.set_result(None)

        send_task = asyncio.create_task(sender())
        tasks = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        late = 0.0
        for i, e in enumerate(stream):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            mine = (loop.create_future(), loop.create_future())
            before = last_of_user.get(e.user_id)
            last_of_user[e.user_id] = mine
            tasks.append(asyncio.create_task(handle(i, e, before, mine)))
        await asyncio.gather(*tasks)
        done.set()
        await send_task
        wall = loop.time() - start
    latencies.sort()
    scored = [hits[i] for i in sorted(hits)]
    with_exact = [exact.get(i, (0.0, 0.0)) for i in sorted(hits)]
    return {
        "hits": [h for h, _ in scored], "ndcgs": [g for _, g in scored], "errors": errors[0],
        "exact_history_hits": [h for h, _ in with_exact],
        "achieved_rate": len(stream) / wall, "max_lateness_s": late,
        "versions_seen": len(versions),
        "short_history": short_history[0],
        "recommend_ms": {"p50": 1e3 * latencies[len(latencies) // 2],
                         "p99": 1e3 * latencies[int(0.99 * (len(latencies) - 1))]},
    }


def _hit(body: dict[str, Any], target: str) -> tuple[float, float]:
    """(hit, NDCG) of `target` in a /recommend answer."""
    ranked = [it["item_id"] for it in body["items"]][:K]
    if target not in ranked:
        return 0.0, 0.0
    return 1.0, 1.0 / math.log2(ranked.index(target) + 2)


def offline(ds: Dataset, events: Sequence[Interaction], n_warm: int, rate: float,
            methods: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """Per-event (hit, ndcg) of each method on events[n_warm:], learned with the live trainer's
    batching at `rate` (no held-out warm-up events: the live client sends them all)."""
    from bench import quality

    # ties="id" keeps `events` in the order given (the live order); seed 0 is the trainer's
    # model seed, so both sides start from the same initialisation
    cfg = quality.QualityConfig(rate=rate, warmup_events=n_warm, holdout="none", per_event=True,
                                loo=False, window=max(1, len(events) - n_warm), ties="id",
                                seed=0)
    data = replace(ds, interactions=list(events))
    out = quality.run_quality(data, list(methods), cfg)
    return {m: r["per_event"] for m, r in out["methods"].items()}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run(rates: Sequence[float], scored: int, max_get_rate: float, seed: int, home: Path,
        redis_url: str, log: Any = print) -> dict[str, Any]:
    """Every rate: live replay, then the offline methods on the same events."""
    import torch

    torch.set_num_threads(1)
    ds = load_movielens(ml100k_dir())
    events = hash_ties(ds.interactions, seed)
    n_warm = len(events) // 2
    runs = []
    for rate in rates:
        stride = max(1, math.ceil(rate / max_get_rate))
        n_stream = min(len(events) - n_warm, scored * stride)
        part = events[: n_warm + n_stream]
        log(f"rate {rate:g}/s: warm-up {n_warm} events over HTTP, then {n_stream} events, "
            f"every {stride} scored ({math.ceil(n_stream / stride)} rankings)")
        live = replay_live(ds, part, n_warm, rate, stride, home / f"rate-{rate:g}", redis_url)
        log(f"  live HR@{K} {_mean(live['hits']):.4f} in {live['warmup_s']:.0f} s warm-up; "
            f"offline runs next")
        per_event = offline(ds, part, n_warm, rate, ("incremental", "static"))
        row: dict[str, Any] = {
            "rate": rate, "achieved_rate": live["achieved_rate"], "stride": stride,
            "stream_events": n_stream, "scored": len(live["hits"]),
            f"live_hr@{K}": _mean(live["hits"]), f"live_ndcg@{K}": _mean(live["ndcgs"]),
            f"live_exact_history_hr@{K}": _mean(live["exact_history_hits"]),
            **{k: live[k] for k in ("errors", "freshness_s", "recommend_ms", "served_versions",
                                    "versions_seen", "warmup_s", "max_lateness_s",
                                    "short_history")},
        }
        for method, pe in per_event.items():
            sampled = pe[::stride][: len(live["hits"])]
            row[f"{method}_hr@{K}"] = _mean([h for h, _ in sampled])
            row[f"{method}_ndcg@{K}"] = _mean([g for _, g in sampled])
        inc = row[f"incremental_hr@{K}"]
        row["live_vs_incremental"] = row[f"live_hr@{K}"] / inc - 1 if inc else None
        row["ci95_live_vs_incremental"] = _paired_ci(
            live["hits"], [h for h, _ in per_event["incremental"][::stride]], inc)
        st = row[f"static_hr@{K}"]
        row["live_vs_static"] = row[f"live_hr@{K}"] / st - 1 if st else None
        row["ci95_live_vs_static"] = _paired_ci(
            live["hits"], [h for h, _ in per_event["static"][::stride]], st)
        runs.append(row)
        log("  " + _row_text(row))
    return {"protocol": {"dataset": ds.name, "ties": f"hash(seed={seed})", "warmup_events": n_warm,
                         "k": K, "max_get_rate": max_get_rate, "machine": _machine()},
            "runs": runs}


def _paired_ci(live: Sequence[float], off: Sequence[float], base: float) -> list[float] | None:
    """95% paired-bootstrap interval of live HR / offline HR - 1 over the scored events."""
    n = min(len(live), len(off))
    if not n or not base:
        return None
    return paired_ratio_ci(list(live[:n]), list(off[:n]))["ci"]  # type: ignore[return-value]


def _machine() -> str:
    return f"{os.cpu_count()} CPU cores, {sys.platform}"


def _row_text(row: dict[str, Any]) -> str:
    f = row["freshness_s"]
    return (f"rate {row['rate']:>6g}  live {row[f'live_hr@{K}']:.4f}  incremental "
            f"{row[f'incremental_hr@{K}']:.4f}  static {row[f'static_hr@{K}']:.4f}  "
            f"live/inc {100 * (row['live_vs_incremental'] or 0):+.1f}%  "
            f"live/static {100 * (row['live_vs_static'] or 0):+.1f}%  "
            f"freshness p50/p99 {_s(f['p50'])}/{_s(f['p99'])}  errors {row['errors']}")


def _f4(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def format_table(result: dict[str, Any]) -> str:
    head = (f"| rate (ev/s) | achieved | scored | live HR@{K} | offline incremental | offline "
            f"static | live vs incremental (95% CI) | live NDCG@{K} | incr. NDCG | static NDCG | "
            "freshness p50 / p99 | /recommend p50 / p99 | short history | live, exact history HR@"
            f"{K} | errors |")
    lines = [head, "|" + " --- |" * 15]
    for r in result["runs"]:
        ci = r["ci95_live_vs_incremental"]
        ci_s = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
        f, lat = r["freshness_s"], r["recommend_ms"]
        lines.append(
            f"| {r['rate']:g} | {r['achieved_rate']:.0f} | {r['scored']} | "
            f"{r[f'live_hr@{K}']:.4f} | {r[f'incremental_hr@{K}']:.4f} | "
            f"{r[f'static_hr@{K}']:.4f} | {100 * (r['live_vs_incremental'] or 0):+.1f}%{ci_s} | "
            f"{r[f'live_ndcg@{K}']:.4f} | {r[f'incremental_ndcg@{K}']:.4f} | "
            f"{r[f'static_ndcg@{K}']:.4f} | {_s(f['p50'])} / {_s(f['p99'])} | "
            f"{lat['p50']:.1f} / {lat['p99']:.1f} ms | {r.get('short_history', '-')} | "
            f"{_f4(r.get(f'live_exact_history_hr@{K}'))} | {r['errors']} |")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "live.json", out / "live.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    runs = result["runs"]
    labels = [f"{r['rate']:g}/s" for r in runs]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    width = 0.27
    for j, (key, name) in enumerate(((f"live_hr@{K}", "live (HTTP)"),
                                     (f"incremental_hr@{K}", "offline incremental"),
                                     (f"static_hr@{K}", "offline static"))):
        ax.bar([x + (j - 1) * width for x in range(len(runs))], [r[key] for r in runs], width,
               label=name)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_xlabel("event rate")
    ax.set_ylabel(f"HR@{K} on the scored events")
    ax.set_title("Served quality while learning live vs the offline benchmark")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.live [--rates 20,200,1000] [--scored 5000] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="freshrec bench live", description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="20,200,1000", help="comma-separated events/s")
    p.add_argument("--scored", type=int, default=5000, help="rankings scored per rate")
    p.add_argument("--max-get-rate", type=float, default=50.0,
                   help="most GET /recommend per second the client asks for (it shares 2 cores "
                   "with the stack); faster streams score every s-th event")
    p.add_argument("--seed", type=int, default=0, help="seed of the same-second tie order")
    p.add_argument("--redis", default=os.environ.get("FRESHREC_REDIS_URL",
                                                     "redis://127.0.0.1:6379/0"))
    p.add_argument("--home", default=".freshrec/bench-live", help="logs of the stacks")
    p.add_argument("--out", default="bench/out/live")
    args = p.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates must be numbers separated by commas, got {args.rates!r}")
    if not rates or min(rates) <= 0 or args.scored < 1:
        p.error("every rate must be positive and --scored at least 1")
    from freshrec.services import redis_answers

    if not redis_answers(args.redis):
        p.error(f"no Redis answers at {args.redis} (set --redis or FRESHREC_REDIS_URL)")
    t0 = time.monotonic()
    result = run(rates, args.scored, args.max_get_rate, args.seed, Path(args.home), args.redis,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True))
    json_path, png_path = write_outputs(result, Path(args.out))
    print(format_table(result))
    print(f"wrote {json_path} and {png_path} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
