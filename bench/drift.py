"""Forgetting under recurring drift: a synthetic stream in regimes A -> B -> A.

Regime A: each user keeps to a home topic (``topic_affinity`` of their events, the rest uniform).
Regime B: each user's next item comes from the topic *paired* with their previous item's topic
(topics 0<->1, 2<->3, ...), so a user alternates between two topics. The two regimes contradict
each other where a sequence model learns: after A, "newest item in topic t" means "next in t";
after B it means "next in the pair of t". The catalog (items, texts, topics) is the same
throughout and comes from `freshrec.data.synthetic_stream`.

Probe users (``probe_frac`` of them) are active in the first A only; the last ``probe_events``
events of each are held out and never trained on. Forgetting is their HR@k from the model at the
end of the first A ("before") against the model at the end of B ("after"), paired over the probe
events: ``relative_drop = (before - after) / before`` with a 95% bootstrap interval
(`bench.stats`). Prequential HR@k in B and in the second A says how fast each method adapts and
comes back.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from bench.stats import mean_ci, paired_ratio_ci, relative_drop_ci
from freshrec.data import Dataset, Interaction, synthetic_stream

__all__ = ["DriftStream", "collect_drift", "merge_drift_raw", "recurring_drift_stream",
           "run_recurring_drift", "summarize_drift"]


class DriftStream:
    """The stream, its regime boundaries and the probe cases' positions."""

    def __init__(self, dataset: Dataset, bounds: list[tuple[str, int, int]],
                 probe: set[int]) -> None:
        self.dataset = dataset
        self.bounds = bounds  # (regime, start, end) in event positions
        self.probe = probe  # positions of held-out events of probe users (first regime only)


def recurring_drift_stream(n_users: int = 500, n_items: int = 1200, per_regime: int = 10_000,
                           seed: int = 0, regimes: str = "ABA", n_topics: int = 16,
                           topic_affinity: float = 0.9, probe_frac: float = 0.3,
                           probe_events: int = 5) -> DriftStream:
    """A deterministic stream of `per_regime` events per letter of `regimes` (see the module)."""
    if n_topics < 2 or n_topics % 2 or set(regimes) - {"A", "B"} or not regimes:
        raise ValueError("n_topics must be even and >= 2; regimes a string of A and B")
    catalog = synthetic_stream(n_users, n_items, 0, 0, seed, n_topics=n_topics,
                               initial_items=1.0, initial_users=1.0)
    rng = random.Random(seed + 1_000_003)
    by_topic: list[list[str]] = [[] for _ in range(n_topics)]
    topic_of: dict[str, int] = {}
    for it in catalog.items:
        by_topic[it.fields["topic"]].append(it.item_id)
        topic_of[it.item_id] = it.fields["topic"]
    home = [rng.randrange(n_topics) for _ in range(n_users)]
    n_probe = int(n_users * probe_frac)
    regular = list(range(n_probe, n_users))
    seen: list[set[str]] = [set() for _ in range(n_users)]
    last_topic = list(home)
    events: list[Interaction] = []
    bounds: list[tuple[str, int, int]] = []
    for r, regime in enumerate(regimes):
        start = len(events)
        for _ in range(per_regime):
            user = rng.randrange(n_users) if r == 0 else rng.choice(regular)
            topic = home[user] if regime == "A" else last_topic[user] ^ 1
            if rng.random() >= topic_affinity:
                topic = rng.randrange(n_topics)
            pool = [i for i in by_topic[topic] if i not in seen[user]] or by_topic[topic]
            item = rng.choice(pool)
            seen[user].add(item)
            last_topic[user] = topic_of[item]
            events.append(Interaction(str(user), item, 1_000_000_000.0 + len(events), "click"))
        bounds.append((regime, start, len(events)))
    first_end = bounds[0][2]
    positions: dict[str, list[int]] = {}
    for pos, e in enumerate(events[:first_end]):
        if int(e.user_id) < n_probe:
            positions.setdefault(e.user_id, []).append(pos)
    probe = {p for pos in positions.values() if len(pos) > probe_events for p in pos[-probe_events:]}
    name = f"recurring-drift-{regimes}-{seed}"
    return DriftStream(Dataset(items=catalog.items, interactions=events, name=name), bounds, probe)


def _one(name: str, stream: DriftStream, cfg: Any) -> dict[str, Any]:
    """Train one method on the first regime, then run the later ones prequentially."""
    from bench.quality import (
        METHODS,
        WarmupSplit,
        _Histories,
        _learn_passes,
        prequential,
        score_cases,
    )

    t0 = time.perf_counter()
    events = stream.dataset.interactions
    _, _, first_end = stream.bounds[0]
    first = events[:first_end]
    hist = _Histories(cfg.history_len)
    probe_cases = []
    for pos, e in enumerate(first):
        if pos in stream.probe:
            probe_cases.append(hist.case(e))
        hist.add(e)
    train = [e for pos, e in enumerate(first) if pos not in stream.probe]
    model = METHODS[name](stream.dataset.items, cfg)
    model.add_items(stream.dataset.items)
    _learn_passes(model, train, cfg, 1)
    probes = [[h for h, _ in score_cases(model, probe_cases, cfg.k)]]
    phases: list[dict[str, Any]] = []
    for regime, start, end in stream.bounds[1:]:
        split = WarmupSplit(train=[], heldout=[], stream=list(events[start:end]),
                            all_warmup=list(events[:start]))
        res = prequential(model, split, cfg)
        phases.append({"regime": regime, "start": start, "end": end,
                       f"hr@{cfg.k}": res.overall.as_dict(cfg.k)[f"hr@{cfg.k}"],
                       "_hits": [h for h, _ in res.per_event], "windows": res.windows})
        probes.append([h for h, _ in score_cases(model, probe_cases, cfg.k)])
    return {"probes": probes, "phases": phases, "n_probe": len(probe_cases),
            "wall_s": time.perf_counter() - t0}


def collect_drift(methods: Sequence[str], seeds: Sequence[int], per_regime: int, cfg: Any,
                  log: Callable[[str], None] | None = None, regimes: str = "ABA",
                  n_users: int = 500, n_items: int = 1200) -> dict[str, Any]:
    """Every method on the A -> B -> A stream, once per seed: the raw runs."""
    k = cfg.k
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:
        stream = recurring_drift_stream(n_users, n_items, per_regime, seed, regimes)
        scfg = replace(cfg, seed=seed, events=None)
        for name in methods:
            res = _one(name, stream, scfg)
            runs[name].append(res)
            if log is not None:
                n = max(res["n_probe"], 1)
                hrs = " ".join(f"{p['regime']} {p[f'hr@{k}']:.4f}" for p in res["phases"])
                log(f"drift seed {seed} {name}: probe HR {sum(res['probes'][0]) / n:.4f} -> "
                    f"{sum(res['probes'][1]) / n:.4f}; {hrs}; {res['wall_s']:.0f} s")
    protocol = {"regimes": regimes, "per_regime": per_regime, "n_users": n_users,
                "n_items": n_items, "seeds": list(seeds), "k": k,
                "description": __doc__.split("\n\n")[1].replace("\n", " ")}
    return {"protocol": protocol, "runs": runs}


def merge_drift_raw(raws: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Raw drift runs of other seeds or other methods as one (see `bench.quality.merge_raw`)."""
    from bench.quality import merge_raw

    return merge_raw(raws)


def summarize_drift(raw: dict[str, Any]) -> dict[str, Any]:
    """Per method: forgetting with CI, HR per regime; and the paired gain of `incremental` over
    each other method on the probe after B and on the later regimes (prequential)."""
    runs, k = raw["runs"], raw["protocol"]["k"]
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        before = [r["probes"][0] for r in rs]
        after = [r["probes"][1] for r in rs]
        hr_before, ci_before = mean_ci(before)
        hr_after, ci_after = mean_ci(after)
        phases = []
        for i, ph in enumerate(rs[0]["phases"]):
            hr, ci = mean_ci([r["phases"][i]["_hits"] for r in rs])
            phases.append({"regime": ph["regime"], "start": ph["start"], "end": ph["end"],
                           f"hr@{k}": hr, f"hr@{k}_ci": ci,
                           f"probe_hr@{k}_after": mean_ci([r["probes"][i + 1] for r in rs])[0]})
        out[name] = {
            "forgetting": {**relative_drop_ci(before, after), f"hr@{k}_before": hr_before,
                           f"hr@{k}_before_ci": ci_before, f"hr@{k}_after": hr_after,
                           f"hr@{k}_after_ci": ci_after, "n_probe": sum(len(b) for b in before)},
            "phases": phases,
            "wall_s": sum(r["wall_s"] for r in rs) / len(rs),
        }
    comparisons: dict[str, Any] = {}
    if "incremental" in runs:
        inc = runs["incremental"]
        for name, rs in runs.items():
            if name == "incremental":
                continue
            comparisons[f"incremental_vs_{name}"] = {
                "probe_after_b": paired_ratio_ci([r["probes"][1] for r in inc],
                                                 [r["probes"][1] for r in rs]),
                "stream": paired_ratio_ci(
                    [[h for p in r["phases"] for h in p["_hits"]] for r in inc],
                    [[h for p in r["phases"] for h in p["_hits"]] for r in rs]),
            }
    return {"protocol": raw["protocol"], "methods": out, "comparisons": comparisons}


def run_recurring_drift(methods: Sequence[str], seeds: Sequence[int], per_regime: int, cfg: Any,
                        log: Callable[[str], None] | None = None, **kwargs: Any) -> dict[str, Any]:
    """`collect_drift` then `summarize_drift`: what quality.json's ``recurring_drift`` holds."""
    return summarize_drift(collect_drift(methods, seeds, per_regime, cfg, log, **kwargs))
