"""Prometheus metrics of the API server.

One process per replica: scale out with more replicas (compose runs two), not with uvicorn
workers, so each /metrics answer is the whole truth of its process and needs no multiprocess
registry directory.
"""

from prometheus_client import Counter, Gauge, Histogram

FRESHNESS = Histogram(
    "freshrec_freshness_seconds",
    "Event produce time -> this server starts serving a version trained on it (sampled).",
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 5, 10, 30, 60, 300))
MODEL_AGE = Gauge("freshrec_model_age_seconds", "Now minus the served version's creation time.")
REQUEST_SECONDS = Histogram(
    "freshrec_http_request_duration_seconds", "Request latency by route and status.",
    ["route", "method", "status"],
    buckets=(.001, .0025, .005, .0075, .01, .025, .05, .1, .25, .5, 1, 2.5))
IN_FLIGHT = Gauge("freshrec_http_requests_in_flight", "Requests being served.")
SWAPS = Counter("freshrec_model_swaps", "Hot swaps to a new verified version.")
SWAP_FAILURES = Counter("freshrec_model_swap_failures",
                        "Versions refused (the last good one kept serving).", ["reason"])
VERSION = Gauge("freshrec_model_version", "The version being served (0 = none yet).")
