"""Does the validation gate judge in time, pass a clean stream and refuse a poisoned burst?

The replay of `freshrec bench quality --rate R` (`bench.quality.prequential` driving
`bench.neural.NeuralRecommender`, so micro-batches close and publishes happen as the live
trainer's do, and `OnlineLearner.gate` runs before every publish), on ML-100K with each user's
same-second events ordered by a seeded hash, the first half as warm-up. Every stream event is
scored with the *served* weights (the last published ones), on its true item and true history.

Per rate (50 and 200 events/s by default):

1. **cold**: a fresh model on the first `COLD_EVENTS` events on the clock: how long until the
   gate first judges (publishes before that go out with no verdict: fewer than
   `gate_min_events` held out, or nothing published yet).
2. **clean**: after the warm-up, the whole stream. Counts verdicts, refusals (the goal is 0),
   publishes with no verdict, and the time from the arrival of the first event an interval
   learned to the verdict on it, in seconds of the arrival clock.
3. **burst, gated**: the same stream where `--burst-events` consecutive events, from stream
   position `--burst-at` on, reach the learner with a wrong item; the harness still scores the
   true events. The run stops `--after` events past the burst. How the wrong item is chosen
   (`--wrong`, comma-separated to run several):

   - "tail" (default): a random item of the less popular half of the catalog (warm-up
     counts). Label noise no model can learn, as a broken producer or a bot sends: the burst's
     own held-out events are unpredictable for the published and the candidate weights alike,
     so the verdict rests on what the burst does to the rest.
   - "pop": a random one of the 100 most popular items: wrong labels that look plausible and
     compete for the top 10 with the right ones.
   - "perm": the item through one fixed random permutation of the catalog. A consistent
     relabelling: a model can learn it, and on recent events it reads as a change of taste
     (the burst's held-out events favour the weights that learned it), which a gate judging
     on recent events must let through.
4. **burst, ungated**: the same, but every verdict is ignored (published anyway; what the gate
   said is kept): the served quality the gate protects.

``python -m bench.gate --out DIR`` prints a table and writes DIR/gate.json and DIR/gate.png;
``--quick`` runs on the first 20,000 events.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.neural import BASE_CONFIG, NeuralRecommender
from bench.quality import (
    QualityConfig,
    WarmupSplit,
    _learn_passes,
    _overrides,
    ordered_events,
    prequential,
    split_warmup,
)
from freshrec.data import Dataset, Interaction, load_movielens, ml100k_dir
from model.config import ModelConfig
from model.learner import GateDecision

__all__ = ["Burst", "GateBenchConfig", "GateProbe", "main", "poisoned", "run_gate_bench"]

K = 10
WRONG = ("tail", "pop", "perm")
POPULAR = 100  # "pop": the wrong item is one of this many most popular items
COLD_EVENTS = 2000  # events the cold-start run replays on the clock
Log = Callable[[str], None]


@dataclass(frozen=True)
class Burst:
    """Which stream events reach the learner with a wrong item, and how it is chosen."""

    start: int  # stream position (events after warm-up) of the first poisoned event
    events: int  # how many consecutive events
    wrong: str = "tail"  # one of WRONG
    seed: int = 0

    @property
    def end(self) -> int:
        return self.start + self.events


def poisoned(stream: Sequence[Interaction], warm: Sequence[Interaction], items: Sequence[str],
             burst: Burst) -> dict[int, Interaction]:
    """Stream position -> the event the learner gets instead: same user and time, a wrong
    item chosen as `burst.wrong` says (never the event's own item)."""
    rng = random.Random(burst.seed)
    counts = Counter(e.item_id for e in warm)
    order = sorted(items, key=lambda i: (counts[i], rng.random()))  # least popular first
    pool = order[-POPULAR:] if burst.wrong == "pop" else order[: len(order) // 2]
    perm = dict(zip(items, rng.sample(list(items), len(items)), strict=True))
    out = {}
    for pos in range(burst.start, min(burst.end, len(stream))):
        e = stream[pos]
        item = perm[e.item_id] if burst.wrong == "perm" else rng.choice(pool)
        while item == e.item_id:
            item = rng.choice(pool)
        out[pos] = replace(e, item_id=item)
    return out


class GateProbe(NeuralRecommender):
    """`NeuralRecommender` that ranks with its published weights (what a server serves), hands
    the learner the poisoned copy of a burst's events, and logs every verdict of its gate.

    `obey=False`: publish whatever the gate says (the ungated run), logging what it said."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, "gate")
        self.position: dict[int, int] = {}  # id(stream event) -> stream position
        self.poison: dict[int, Interaction] = {}  # id(stream event) -> what the learner gets
        self.burst: Burst | None = None
        self.verdicts: list[dict[str, Any]] = []  # one per publish or refusal in the stream
        self._now = 0.0
        self._learned: list[int] = []  # stream positions learned since the last verdict

    def start_stream(self, stream: Sequence[Interaction], rate: float,
                     poison: dict[int, Interaction] | None = None, burst: Burst | None = None,
                     obey: bool = True) -> None:
        """Arrive at `rate` from now on; `poison` (stream position -> event) is what the learner
        gets instead of those events."""
        self.rate, self.obey, self.burst = rate, obey, burst
        self.position = {id(e): p for p, e in enumerate(stream)}
        self.poison = {id(stream[p]): e for p, e in (poison or {}).items()}
        self.end_warmup()

    def learn(self, batch: Sequence[Interaction]) -> None:
        """Learn the batch as the learner receives it (the burst poisoned)."""
        if self.streaming:
            self._learned.extend(self.position[id(e)] for e in batch)
            batch = [self.poison.get(id(e), e) for e in batch]
        super().learn(batch)

    def tick(self, now: float) -> None:
        """A simulated poll at `now`: publish if the trainer would."""
        self._now = now
        super().tick(now)

    def _verdict(self, decision: GateDecision) -> None:
        """Log the verdict of a publish in the stream."""
        if not self.streaming:
            return
        assert self.rate is not None, "start_stream sets the rate"
        learned, self._learned = self._learned, []
        burst = self.burst
        self.verdicts.append({
            "t": self._now,
            "first_arrival": min(learned) / self.rate if learned else self._now,
            "events": len(learned),
            "burst_events": sum(burst.start <= p < burst.end for p in learned) if burst else 0,
            "judged": decision.events,
            "publish": decision.publish,
            "hr": decision.hr,
            "reference": decision.reference,
        })

    def rank_batch(self, histories: Sequence[Sequence[str]], k: int,
                   exclude: Sequence[Collection[str]]) -> list[list[str]]:
        """Top-k with the served (last published) weights; the current ones before any."""
        if not self.publishes:
            return super().rank_batch(histories, k, exclude)
        ranked = self.learner.published_scorer().rank_batch(histories, k, exclude)
        return [[item for item, _ in r] for r in ranked]


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"))
    arr = np.asarray(values, dtype=float)
    p50, p90, p99 = np.quantile(arr, [0.5, 0.9, 0.99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(arr.max()),
            "mean": float(arr.mean())}


def _hr(hits: Sequence[float], lo: int, hi: int) -> float | None:
    part = hits[max(0, lo):min(hi, len(hits))]
    return float(np.mean(part)) if len(part) else None


def _spans(burst: Burst, after: int) -> dict[str, tuple[int, int]]:
    """The stream spans served HR@10 is reported on, in stream positions."""
    s, e = burst.start, burst.end
    first = max(1, after // 4)
    return {"before": (max(0, s - 2000), s), "during": (s, e), "after": (e, e + first),
            "later": (e + first, e + after)}


def _summary(probe: GateProbe, hits: Sequence[float], burst: Burst | None, after: int,
             wall_s: float) -> dict[str, Any]:
    """What one run measured: verdicts, refusals, verdict latency, burst refusal, served HR."""
    v = probe.verdicts
    judged = [r for r in v if r["judged"]]
    ratios = [r["hr"] / r["reference"] for r in judged if r["reference"] > 0]
    out: dict[str, Any] = {
        "stream_events": len(hits),
        "publishes": sum(r["publish"] or not probe.obey for r in v),
        "verdicts": len(judged),
        "refusals": sum(not r["publish"] for r in judged),
        "no_verdict_publishes": len(v) - len(judged),
        "first_verdict_s": judged[0]["t"] if judged else None,
        "verdict_latency_s": _quantiles([r["t"] - r["first_arrival"] for r in judged]),
        "events_per_verdict": _quantiles([r["events"] for r in judged]),
        "min_hr_ratio": min(ratios, default=None),  # candidate / reference, the closest call
        f"served_hr@{K}": float(np.mean(hits)) if len(hits) else None,
        "wall_s": wall_s,
        "gate_s": probe.gate_s,
    }
    if burst is not None:
        assert probe.rate is not None, "a stream run has a rate"
        t0, t1 = burst.start / probe.rate, burst.end / probe.rate
        trained = [r for r in judged if r["burst_events"]]
        refused = [r for r in trained if not r["publish"]]
        first = next((r["t"] - t0 for r in judged if not r["publish"] and r["t"] >= t0), None)
        out["burst"] = {
            "intervals": len(trained),
            "refused_intervals": len(refused),
            "events_refused": sum(r["burst_events"] for r in refused),
            "events_published": sum(r["burst_events"] for r in trained if r["publish"]),
            "first_refusal_after_s": first,
            "refusals_after": sum(not r["publish"] for r in judged if r["first_arrival"] >= t1),
            "min_hr_ratio": min((r["hr"] / r["reference"] for r in judged
                                 if r["reference"] > 0 and r["t"] >= t0), default=None),
        }
    out["_timeline"] = [(r["t"], r["publish"], r["hr"] / r["reference"])
                        for r in judged if r["reference"] > 0]
    return out


def _stream_run(warm: GateProbe, split: WarmupSplit, qcfg: QualityConfig, rate: float,
                events: int | None = None, burst: Burst | None = None, obey: bool = True,
                ) -> tuple[GateProbe, list[float], float]:
    """A copy of `warm` through the first `events` stream events arriving at `rate`: the
    probe, each event's served hit, and the wall time."""
    t0 = time.perf_counter()
    probe = copy.deepcopy(warm)
    stream = split.stream[:events] if events else split.stream
    poison = None
    if burst is not None:
        poison = poisoned(stream, split.all_warmup, list(probe.learner.item_ids), burst)
    probe.start_stream(stream, rate, poison, burst, obey)
    result = prequential(probe, replace(split, stream=list(stream)), replace(qcfg, rate=rate))
    return probe, [h for h, _ in result.per_event], time.perf_counter() - t0


def _cold_start(dataset: Dataset, events: Sequence[Interaction], qcfg: QualityConfig,
                model_cfg: ModelConfig, rate: float) -> dict[str, Any]:
    """A fresh model on the first events on the clock: when the gate first judges."""
    t0 = time.perf_counter()
    fresh = GateProbe(model_cfg)
    fresh.add_items(dataset.items)
    cold = WarmupSplit(train=[], heldout=[], stream=list(events[:COLD_EVENTS]), all_warmup=[])
    probe, hits, _ = _stream_run(fresh, cold, qcfg, rate)
    judged = [r for r in probe.verdicts if r["judged"]]
    return {
        "events": len(hits),
        "publishes": len(probe.verdicts),
        "no_verdict_publishes": len(probe.verdicts) - len(judged),
        "first_verdict_s": judged[0]["t"] if judged else None,
        "first_verdict_events": round(judged[0]["t"] * rate) if judged else None,
        "refusals": sum(not r["publish"] for r in judged),
        "wall_s": time.perf_counter() - t0,
    }


@dataclass
class GateBenchConfig:
    """What the gate benchmark replays."""

    events: int | None = None  # the first N events of ML-100K (None: all)
    rates: tuple[float, ...] = (50.0, 200.0)
    burst_at: int = 5000  # stream position of the burst's first event
    burst_events: int = 2000
    after: int = 8000  # stream events scored after the burst (the burst runs stop there)
    wrong: tuple[str, ...] = ("tail",)
    seed: int = 0


def run_gate_bench(dataset: Dataset, cfg: GateBenchConfig, model_cfg: ModelConfig,
                   log: Log | None = None) -> dict[str, Any]:
    """Warm up once; then per rate the cold-start, clean and burst runs (module docstring)."""
    say = log or (lambda _msg: None)
    qcfg = QualityConfig(events=cfg.events, seed=cfg.seed, loo=False)
    events = ordered_events(dataset, qcfg)
    split = split_warmup(events, qcfg)
    bursts = [Burst(cfg.burst_at, cfg.burst_events, w, cfg.seed) for w in cfg.wrong]
    end = cfg.burst_at + cfg.burst_events + cfg.after
    if end > len(split.stream):
        raise ValueError(f"the burst and --after need {end} stream events, the stream has "
                         f"{len(split.stream)}")
    model_cfg = replace(model_cfg, seed=cfg.seed)
    t0 = time.perf_counter()
    warm = GateProbe(model_cfg)
    warm.add_items(dataset.items)
    _learn_passes(warm, split.train, qcfg, qcfg.warmup_passes)
    say(f"warm-up: {len(split.train)} events in {time.perf_counter() - t0:.0f} s")
    rates: dict[str, Any] = {}
    for rate in cfg.rates:
        runs: dict[str, Any] = {"cold": _cold_start(dataset, events, qcfg, model_cfg, rate)}
        hits: dict[str, list[float]] = {}
        plan: list[tuple[str, Burst | None, bool]] = [("clean", None, True)]
        plan += [(f"{b.wrong}_{'gated' if obey else 'ungated'}", b, obey)
                 for b in bursts for obey in (True, False)]
        for name, burst, obey in plan:
            probe, hits[name], wall = _stream_run(warm, split, qcfg, rate,
                                                  None if burst is None else end, burst, obey)
            runs[name] = _summary(probe, hits[name], burst, cfg.after, wall)
            runs[name][f"served_hr@{K}_spans"] = {
                span: _hr(hits[name], lo, hi)
                for span, (lo, hi) in _spans(bursts[0], cfg.after).items()}
            say(f"  {rate:g} events/s, {name}: {len(hits[name])} events, "
                f"{runs[name]['verdicts']} verdicts, {runs[name]['refusals']} refused, "
                f"served HR@{K} {runs[name][f'served_hr@{K}']:.4f}, {wall:.0f} s")
        hits["clean"] = hits["clean"][:end]
        runs["_hits"] = hits
        rates[f"{rate:g}"] = runs
    gate_fields = ("gate", "gate_tolerance", "gate_holdout", "gate_set", "gate_min_events",
                   "gate_z", "gate_items")
    return {
        "protocol": {
            "dataset": dataset.name, "events": len(events),
            "warmup_events": len(split.all_warmup), "stream_events": len(split.stream),
            "ties": "hash", "seed": cfg.seed, "k": K,
            "publish_interval_s": qcfg.publish_interval_s,
            "batch_window_s": qcfg.batch_window_s, "batch_max_events": qcfg.batch_size,
            "bursts": [asdict(b) for b in bursts], "after": cfg.after,
            "spans": _spans(bursts[0], cfg.after),
            "gate": {f: getattr(model_cfg, f) for f in gate_fields},
        },
        "rates": rates,
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    """The headline numbers, one row per rate and run."""
    head = (f"{'ev/s':>5} {'run':<13}{'verdicts':>9}{'refused':>8}{'no verd.':>9}"
            f"{'lat p50':>8}{'lat p99':>8}{'lat max':>8}{'burst ref.':>11}{'1st ref s':>10}"
            f"{'min ratio':>10}{'HR before':>10}{'during':>8}{'after':>8}{'later':>8}")
    lines = [head, "-" * len(head)]
    for rate, runs in result["rates"].items():
        for name, r in runs.items():
            if name.startswith("_") or name == "cold":
                continue
            lat, b = r["verdict_latency_s"], r.get("burst")
            spans = r[f"served_hr@{K}_spans"]
            refused = f"{b['refused_intervals']}/{b['intervals']}" if b else "-"
            lines.append(
                f"{rate:>5} {name:<13}{r['verdicts']:>9}{r['refusals']:>8}"
                f"{r['no_verdict_publishes']:>9}{_fmt(lat['p50'], '.2f'):>8}"
                f"{_fmt(lat['p99'], '.2f'):>8}{_fmt(lat['max'], '.2f'):>8}"
                f"{refused:>11}"
                f"{_fmt(b and b['first_refusal_after_s'], '.1f'):>10}"
                f"{_fmt((b or r)['min_hr_ratio'], '.2f'):>10}"
                f"{_fmt(spans['before']):>10}{_fmt(spans['during']):>8}"
                f"{_fmt(spans['after']):>8}{_fmt(spans['later']):>8}")
        c = runs["cold"]
        lines.append(f"{rate:>5} cold start: {c['no_verdict_publishes']} of {c['publishes']} "
                     f"publishes with no verdict; first verdict at {_fmt(c['first_verdict_s'], '.1f')}"
                     f" s ({c['first_verdict_events']} events)")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """gate.json, and gate.png: per rate, the served HR@10 of each burst run minus the clean
    run's (rolling), and what the gate saw at each verdict (candidate / reference HR@10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "gate.json", out / "gate.png"
    hits = {rate: runs.pop("_hits") for rate, runs in result["rates"].items()}
    timelines = {rate: {name: r.pop("_timeline") for name, r in runs.items() if name != "cold"}
                 for rate, runs in result["rates"].items()}
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    burst = result["protocol"]["bursts"][0]
    floor = 1 - result["protocol"]["gate"]["gate_tolerance"]
    rates = list(result["rates"])
    fig, axes = plt.subplots(2, len(rates), figsize=(6.5 * len(rates), 7.5), squeeze=False)
    roll = 1000
    for col, rate in enumerate(rates):
        top, bottom = axes[0][col], axes[1][col]
        clean = np.asarray(hits[rate]["clean"])
        for name, h in hits[rate].items():
            n = min(len(h), len(clean))
            if name != "clean" and n >= roll:
                diff = np.convolve(np.asarray(h[:n]) - clean[:n], np.ones(roll) / roll, "valid")
                top.plot(np.arange(roll, n + 1), diff, label=name.replace("_", ", "),
                         ls="--" if name.endswith("ungated") else "-")  # equal if none refused
        for name, line in timelines[rate].items():
            if not line or name.endswith("ungated"):  # the ungated gate saw what gated saw
                continue
            pos = np.asarray([t for t, _, _ in line]) * float(rate)
            keep = pos <= len(clean)
            ratio = np.asarray([x for _, _, x in line])
            bottom.plot(pos[keep], ratio[keep], ".", markersize=2, label=name.replace("_", ", "))
            refused = [(p, x) for p, (_, ok, x) in zip(pos, line, strict=True) if not ok]
            if refused:
                bottom.plot(*zip(*refused, strict=True), "x", color="black",
                            label=f"refused ({name.replace('_', ', ')})")
        bottom.axhline(floor, color="red", lw=1, label=f"1 - gate_tolerance ({floor:.2f})")
        for ax in (top, bottom):
            ax.set_xlim(0, len(clean))
            ax.axvspan(burst["start"], burst["start"] + burst["events"], color="red",
                       alpha=0.1, label="wrong items (burst)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
        top.axhline(0.0, color="black", lw=0.8)
        top.set_title(f"{rate} events/s")
        top.set_ylabel(f"served HR@{K} minus clean's, rolling {roll}")
        bottom.set_ylabel(f"gate: candidate / reference HR@{K}")
        bottom.set_xlabel("stream position (events after warm-up)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.gate [--out DIR] [--quick] [--rates 50,200] ...``."""
    parser = argparse.ArgumentParser(prog="bench.gate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/gate", help="folder for gate.json/.png")
    parser.add_argument("--quick", action="store_true",
                        help="the first 20,000 events, a 1,000-event burst at 2,000, 3,000 after")
    parser.add_argument("--events", type=int, default=None, help="use only the first N events")
    parser.add_argument("--rates", default="50,200", help="comma-separated events/s")
    parser.add_argument("--burst-at", type=int, default=None,
                        help="stream position of the burst (default 5,000)")
    parser.add_argument("--burst-events", type=int, default=None, help="default 2,000")
    parser.add_argument("--after", type=int, default=None,
                        help="stream events scored after the burst (default 8,000)")
    parser.add_argument("--wrong", default="tail",
                        help=f"comma-separated, how the wrong items are chosen: {', '.join(WRONG)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="MovieLens folder (default: ML-100K)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a ModelConfig field (value parsed as JSON), e.g. "
                        "--set gate_tolerance=0.2")
    args = parser.parse_args(argv)
    base = GateBenchConfig(events=20_000, burst_at=2000, burst_events=1000, after=3000) \
        if args.quick else GateBenchConfig()
    wrong = tuple(w.strip() for w in args.wrong.split(",") if w.strip())
    if not wrong or set(wrong) - set(WRONG):
        parser.error(f"--wrong takes {', '.join(WRONG)}")
    cfg = GateBenchConfig(
        events=args.events or base.events,
        rates=tuple(float(r) for r in args.rates.split(",") if r.strip()),
        burst_at=base.burst_at if args.burst_at is None else args.burst_at,
        burst_events=args.burst_events or base.burst_events,
        after=base.after if args.after is None else args.after,
        wrong=wrong, seed=args.seed)
    try:
        model_cfg = replace(BASE_CONFIG, **_overrides(args.set))
    except (TypeError, ValueError) as exc:
        parser.error(f"--set: {exc}")
    import torch

    torch.set_num_threads(1)  # fastest on a shared 2-core CPU (see bench.quality)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    dataset = load_movielens(args.data or ml100k_dir())
    try:
        result = run_gate_bench(dataset, cfg, model_cfg, log)
    except ValueError as exc:
        parser.error(str(exc))
    result["protocol"]["wall_s"] = time.perf_counter() - t0
    print(format_table(result))
    json_path, png_path = write_outputs(result, args.out)
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
