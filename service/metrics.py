"""Prometheus metrics of the API server.

One process per replica: scale out with more replicas (compose runs two), not with uvicorn
workers, so each /metrics answer is the whole truth of its process and needs no multiprocess
registry directory. Never start the API with `uvicorn --workers N` (or WEB_CONCURRENCY > 1):
each worker would keep its own registry and a scrape would see one worker at random.
tests/test_metrics_processes.py holds the entry points to this.
"""

from __future__ import annotations

import gc
import math
import time

from prometheus_client import Counter, Gauge, Histogram

FRESHNESS = Histogram(
    "freshrec_freshness_seconds",
    "Event produce time -> this server starts serving a version trained on it (sampled).",
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 5, 10, 30, 60, 300))
SWAP_DELAY = Histogram(
    "freshrec_swap_delay_seconds",
    "A version's creation in the weight store -> this server starts serving it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30))
MODEL_AGE = Gauge("freshrec_model_age_seconds", "Now minus the served version's creation time.")
REQUEST_SECONDS = Histogram(
    "freshrec_http_request_duration_seconds", "Request latency by route and status.",
    ["route", "method", "status"],
    buckets=(.001, .0025, .005, .0075, .01, .015, .025, .035, .05, .075, .1, .25, .5, 1, 2.5))
IN_FLIGHT = Gauge("freshrec_http_requests_in_flight", "Requests being served.")
SWAPS = Counter("freshrec_model_swaps", "Hot swaps to a new verified version.")
SWAP_FAILURES = Counter("freshrec_model_swap_failures",
                        "Versions refused (the last good one kept serving).", ["reason"])
BUILDS = Counter("freshrec_model_builds",
                 "Ranking views built, by how: full (costs the catalog) or rows (linear item "
                 "tower: from the served view, costs the rows the version changed).", ["how"])
ANN_SERVED_RECALL = Gauge(
    "freshrec_ann_served_recall",
    "recall@10 of the ANN index on queries requests searched with, against the exact scan of "
    "the served version (a rolling window of about 100 queries; sampled every 10 s).")
VERSION = Gauge("freshrec_model_version", "The version being served (0 = none yet).")
GC_PAUSE = Histogram(
    "freshrec_gc_pause_seconds",
    "Python's cyclic garbage collections in the API, by generation: each holds the GIL, so "
    "every request waits it out.", ["generation"],
    buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5))


class GcPauses:
    """Times the collector's runs into GC_PAUSE while installed (`gc.callbacks`)."""

    def __init__(self) -> None:
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - self._start)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def histogram_quantile(q: float, hist: Histogram) -> float | None:
    """The q-quantile of an unlabelled histogram since this process started, estimated the way
    PromQL's histogram_quantile does: linear interpolation inside the bucket that holds it (the
    first bucket starts at 0; a quantile in the +Inf bucket is the highest finite bound).
    None before the first observation."""
    bounds: list[tuple[float, float]] = []
    for metric in hist.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                bounds.append((float(s.labels["le"]), s.value))
    bounds.sort()
    total = bounds[-1][1] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in bounds:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, cumulative
    return lower


def histogram_count(hist: Histogram) -> int:
    """Observations of an unlabelled histogram since this process started."""
    return int(sum(s.value for m in hist.collect() for s in m.samples if s.name.endswith("_count")))


def counter_total(counter: Counter) -> dict[tuple[str, ...], float]:
    """A counter's values by label values (the empty tuple for an unlabelled one)."""
    out: dict[tuple[str, ...], float] = {}
    for metric in counter.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                out[tuple(s.labels.values())] = s.value
    return out
