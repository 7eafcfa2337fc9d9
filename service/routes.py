"""The HTTP API. Each route reads like the list of what it needs."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from model.events import Interaction, Item
from protocol.errors import Unavailable, VerificationError
from protocol.features import UserReads
from protocol.topics import encode_interaction, encode_item
from service import metrics
from service.batcher import Batcher
from service.deps import (
    AdminAuthorized,
    Authorized,
    BatcherDep,
    HolderDep,
    ProducerDep,
    RankingDep,
    RecentDep,
    SettingsDep,
)
from service.holder import Snapshot
from service.schemas import (
    Accepted,
    EventIn,
    ItemIn,
    ModelOut,
    RecommendIn,
    RecommendOut,
    RollbackIn,
    RollbackOut,
    Scored,
)

router = APIRouter()
STATIC = Path(__file__).parent / "static"
ASSETS = {"status.js": "text/javascript", "status.css": "text/css"}
TRAINER_KEYS = ("events", "events_per_s", "online_hr@10", "online_ndcg@10", "holdout_hr@10", "dlq",
                "newest_event_ts")


async def _rank(snap: Snapshot, reads: UserReads, batcher: Batcher, history: list[str],
                exclude: set[str], k: int, user_id: str | None, stale: bool,
                seen_among: Callable[[list[str]], Awaitable[set[str]]] | None = None) -> Response:
    """Rank with one snapshot; before any verified version, fall back to popularity.
    `seen_among` answers for seen ids beyond `exclude` (a seen-set too large to read whole).
    Requests that queue while a scan runs share the next one (`batcher`)."""

    async def top(n: int) -> list[tuple[str, float]]:
        if snap.scorer is not None:
            return await batcher.rank(snap.scorer, history, n, exclude)
        try:
            pool = await reads.popular(n + len(exclude))
        except redis.exceptions.RedisError:
            pool = []
        return [(i, s) for i, s in pool if i not in exclude][:n]

    ranked = await _unseen_top(top, k, seen_among)
    if snap.scorer is not None:
        used = sum(1 for i in history[-snap.scorer.history_len:] if i in snap.scorer)
        source = "model"
    else:
        used, source = 0, "popularity"
    items = [Scored(item_id=i, score=s, text=snap.catalog[i].text if i in snap.catalog else None)
             for i, s in ranked]
    return prebuilt(RecommendOut(user_id=user_id, items=items, model_version=snap.version,
                                 history_used=used, source=source, stale_features=stale))


def prebuilt(out: BaseModel) -> Response:
    """`out` as a ready JSON response. A route that returns its `response_model` instance has
    FastAPI validate it again (on the thread pool, for a sync route), turn it into a dict and
    json.dumps that: ~0.8 ms a request, against ~20 us for pydantic's own serializer of the
    model we just built and validated (bench/RESULTS.md, "Batching concurrent requests, and
    the JSON path"). The OpenAPI
    document still comes from `response_model`."""
    return Response(out.model_dump_json(), media_type="application/json")


async def _unseen_top(top: Callable[[int], Awaitable[list[tuple[str, float]]]], k: int,
                      seen_among: Callable[[list[str]], Awaitable[set[str]]] | None
                      ) -> list[tuple[str, float]]:
    """The first k of `top(n)` that `seen_among` does not report seen, asking for 4x more
    candidates while seen ones crowd them out (at most log4 of the catalog rounds)."""
    n = k
    while True:
        ranked = await top(n)
        if seen_among is None:
            return ranked
        hidden = await seen_among([i for i, _ in ranked])
        kept = [(i, s) for i, s in ranked if i not in hidden]
        if len(kept) >= k or len(ranked) < n:
            return kept[:k]
        n *= 4


@router.get("/recommend", response_model=RecommendOut)
async def recommend(ranking: RankingDep,
                    user_id: Annotated[str, Query(min_length=1, max_length=256)],
                    k: Annotated[int, Query(ge=1, le=100)] = 10,
                    exclude_seen: bool = True) -> Response:
    """Top-k for a known (or unknown: cold start) user, from the live history in Redis (from
    the last known one while Redis does not answer). On the event loop: it awaits Redis and
    the ranker thread (service/batcher.py), so a request takes no thread of its own."""
    snap = ranking.holder.current  # one read: the whole request is served by this version
    now = time.monotonic()
    stale = not ranking.breaker.allow(now)
    if not stale:
        try:
            view = await ranking.reads.user_view(user_id)  # bounded, however much was seen
            ranking.cache.put(user_id, view)
            ranking.breaker.succeeded()
        except redis.exceptions.RedisError:
            ranking.breaker.failed(time.monotonic())
            stale = True
    if stale:
        view = ranking.cache.get(user_id)
    view = ranking.recent.merge(user_id, view, now)  # accepted, maybe not applied yet
    check = (_seen_checker(ranking.reads, user_id)
             if exclude_seen and not view.complete and not stale else None)
    return await _rank(snap, ranking.reads, ranking.batcher, view.history,
                       view.seen if exclude_seen else set(), k, user_id, stale, check)


def _seen_checker(reads: UserReads, user_id: str) -> Callable[[list[str]], Awaitable[set[str]]]:
    """Asks Redis which candidates the user has seen (for seen-sets too large to read)."""

    async def seen_among(ids: list[str]) -> set[str]:
        try:
            return await reads.seen_among(user_id, ids)
        except redis.exceptions.RedisError:
            return set()  # Redis went away mid-request: exclude what was read

    return seen_among


@router.post("/recommend", response_model=RecommendOut)
async def recommend_anonymous(body: RecommendIn, ranking: RankingDep) -> Response:
    """Top-k for an anonymous session that brings its own history."""
    snap = ranking.holder.current
    known = snap.scorer if snap.scorer is not None else snap.catalog
    unknown = [i for i in body.history if i not in known]
    if unknown and known:
        raise HTTPException(422, f"unknown item ids in history: {unknown[:10]}")
    exclude = set(body.exclude) | (set(body.history) if body.exclude_history else set())
    return await _rank(snap, ranking.reads, ranking.batcher, body.history, exclude, body.k,
                       None, False)


def _send(producer: ProducerDep, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Write to Kafka; 503 (within about a second) when it cannot take the records."""
    try:
        producer.send(topic, records)  # type: ignore[attr-defined]  # a LazyProducer
    except Unavailable as exc:
        raise HTTPException(503, exc.detail,
                            headers={"Retry-After": str(round(exc.retry_after))}) from exc


def _as_batch(body: object, what: str) -> list:
    """One record or a list of them, bounded to 1..1,000 per request."""
    batch = body if isinstance(body, list) else [body]
    if not 1 <= len(batch) <= 1000:
        raise HTTPException(422, f"send between 1 and 1,000 {what} per request")
    return batch


@router.post("/events", status_code=202, response_model=Accepted, dependencies=[Authorized])
def post_events(body: EventIn | list[EventIn], settings: SettingsDep,
                producer: ProducerDep, recent: RecentDep) -> Accepted:
    """One event or a list (at most 1,000) to the interactions topic, keyed by user id."""
    events = _as_batch(body, "events")
    records = []
    for e in events:
        extra = e.model_extra or {}
        records.append((e.user_id.encode(), encode_interaction(
            Interaction(e.user_id, e.item_id, e.ts, e.event), extra)))
    _send(producer, settings.topic_interactions, records)
    now = time.monotonic()
    for e in events:
        recent.add(e.user_id, e.item_id, now)
    return Accepted(accepted=len(records), topic=settings.topic_interactions)


@router.post("/items", status_code=202, response_model=Accepted, dependencies=[Authorized])
def post_items(body: ItemIn | list[ItemIn], settings: SettingsDep,
               producer: ProducerDep) -> Accepted:
    """Catalog items to the items topic; servers pick them up within a poll interval."""
    items = _as_batch(body, "items")
    records = [(i.item_id.encode(), encode_item(Item(i.item_id, i.text, i.model_extra or {})))
               for i in items]
    _send(producer, settings.topic_items, records)
    return Accepted(accepted=len(records), topic=settings.topic_items)


@router.get("/model", response_model=ModelOut)
def model_info(holder: HolderDep) -> ModelOut:
    """The version being served and what it was trained through."""
    snap = holder.current
    out = ModelOut(version=snap.version, swaps=holder.swaps, refused_versions=dict(holder.refused),
                   catalog_items=len(snap.catalog))
    if snap.loaded is not None:
        m = snap.loaded.manifest
        out = out.model_copy(update=dict(parent=m.parent, kind=m.kind, created_at=m.created_at,
                                         age_seconds=time.time() - m.created_at,
                                         encoder=m.encoder, trained_through=m.trained_through))
    return out


@router.post("/admin/rollback", response_model=RollbackOut, dependencies=[AdminAuthorized],
             responses={401: {"description": "Missing or wrong admin bearer token."},
                        404: {"description": "No such version is stored (never published, or "
                              "pruned: only the last versions are kept)."},
                        409: {"description": "The version does not verify; it is not served."},
                        503: {"description": "Admin endpoints are disabled, or Redis is "
                              "unreachable."}})
def rollback(body: RollbackIn, holder: HolderDep) -> RollbackOut:
    """Serve a stored version again (operator rollback). The publisher lease is fenced, so the
    trainer starts over from this version and from the offsets stored with it: the events
    after it are trained again. This server (and every replica) follows the pointer."""
    try:
        record = holder.weights.rollback(body.version, by="api")
    except VerificationError as exc:
        if exc.reason == "missing":
            raise HTTPException(404, exc.detail) from exc
        raise HTTPException(409, f"version {body.version} does not verify: {exc.detail}") from exc
    except redis.exceptions.RedisError as exc:
        raise HTTPException(503, f"Redis is unreachable: {exc}",
                            headers={"Retry-After": "1"}) from exc
    return RollbackOut(version=record["version"], previous=record["previous"],
                       token=record["token"], epoch=record["epoch"])


@router.get("/status")
def status(holder: HolderDep, batcher: BatcherDep) -> dict[str, Any]:
    """What the status page shows, computed here: this server's freshness quantiles (from its
    own Prometheus histogram, since it started), its swaps and refusals, and the trainer's
    numbers as of the served version (the trainer writes them into the manifest)."""
    snap = holder.current
    failures = {labels[0]: int(v) for labels, v in metrics.counter_total(metrics.SWAP_FAILURES)
                .items() if v}
    out: dict[str, Any] = {
        "now": time.time(),
        "version": snap.version,
        "created_at": None,
        "age_seconds": None,
        "freshness_seconds": {
            "count": metrics.histogram_count(metrics.FRESHNESS),
            "p50": metrics.histogram_quantile(0.5, metrics.FRESHNESS),
            "p99": metrics.histogram_quantile(0.99, metrics.FRESHNESS),
        },
        "swaps": holder.swaps,
        "swap_failures": sum(failures.values()),
        "swap_failures_by_reason": failures,
        "catalog_items": len(snap.catalog),
        "redis_ok": holder.redis_ok,
        "trainer": None,
        "retrieval": {**holder.retrieval(), "mean_batch": (
            batcher.requests / batcher.batches if batcher.batches
            else None)},
    }
    if snap.loaded is not None:
        m = snap.loaded.manifest
        through = m.trained_through
        out.update(created_at=m.created_at, age_seconds=max(0.0, time.time() - m.created_at))
        out["trainer"] = {k: through.get(k) for k in TRAINER_KEYS}
    return out


@router.get("/", include_in_schema=False)
def status_page() -> FileResponse:
    """The status page (plain HTML + JS from service/static; it polls /status)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
def static_asset(name: str) -> FileResponse:
    """The page's script and style sheet: a fixed list (no paths from the URL reach the disk),
    and a route of its own so their requests are labelled in the latency metrics."""
    if name not in ASSETS:
        raise HTTPException(404, "no such file")
    return FileResponse(STATIC / name, media_type=ASSETS[name])


@router.get("/healthz", responses={503: {"description": "The model loader is stuck or dead: "
                                         "the process no longer follows new versions."}})
async def healthz(holder: HolderDep, settings: SettingsDep, response: Response) -> dict[str, str]:
    """The process is alive and its model loader is not stuck (a liveness check).
    On the event loop, as /readyz: both read a few attributes, and a loop too busy to answer
    is what a liveness probe should see (via the thread pool each call cost the API ~0.35 ms of
    CPU on an AMD EPYC, on the loop ~0.19: bench/RESULTS.md, "Issue 8, session 14")."""
    problem = holder.problem(settings.loader_stuck_s)
    if problem is not None:
        response.status_code = 503
        return {"status": "stuck", "detail": problem}
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(holder: HolderDep, response: Response) -> dict[str, object]:
    """Ready once a verified version is served; says whether Redis is reachable."""
    ready = holder.current.version > 0
    response.status_code = 200 if ready else 503
    return {"ready": ready, "model_version": holder.current.version, "redis_ok": holder.redis_ok}


@router.get("/metrics")
def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def error_body(detail: object) -> bytes:
    return json.dumps({"detail": detail}).encode()
