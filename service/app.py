"""The FastAPI application: settings, stores and the model holder are built in the lifespan."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.encoder import TextEncoder
from protocol.errors import Unavailable
from protocol.features import FeatureStore, UserReads
from protocol.runtime import freeze_long_lived
from protocol.weights import WeightStore
from service import metrics
from service.batcher import Batcher
from service.deps import Ranking, RecentEvents, RedisBreaker, UserCache
from service.holder import AnnSettings, ModelHolder
from service.routes import error_body, router
from service.settings import ServiceSettings

log = logging.getLogger("freshrec.service")


class LazyProducer:
    """A Kafka producer created on first use, so the API starts (and serves) without Kafka.

    Every write is bounded: a send answers within about `SEND_BUDGET_S` (a broker that went
    away after startup included), and after a failure the next `RETRY_AFTER_S` of writes answer
    503 at once, so failing writes never pin the worker threads `/recommend` needs."""

    RETRY_AFTER_S = 2.0  # after a failure, answer 503 at once for this long (then try again)
    # the longest a write waits for the broker: 0.8 s, so the 503 reaches the client within the
    # 1 s the service promises (measured at 1.0 s it arrived after 1.02-1.08 s on a loaded host)
    SEND_BUDGET_S = 0.8
    # Producer timeouts that add up to the budget: metadata / buffer space (`max_block_ms`),
    # then delivery (`delivery_timeout_ms` >= request timeout + linger). Reconnect attempts back
    # off to at most 1 s, so writes resume within a second or two of the broker's return.
    CONFIG = dict(acks="all", linger_ms=2, max_block_ms=300, request_timeout_ms=650,
                  delivery_timeout_ms=700, bootstrap_timeout_ms=1000,
                  reconnect_backoff_max_ms=1000)

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer = None
        self._lock = threading.Lock()
        self._failed: tuple[float, str] | None = None  # (monotonic time, error) of the last try

    def _unavailable(self, error: str) -> Unavailable:
        return Unavailable(f"Kafka is unavailable, nothing was accepted: {error}",
                           self.RETRY_AFTER_S)

    def _fail(self, exc: Exception) -> Unavailable:
        self._failed = (time.monotonic(), str(exc) or type(exc).__name__)
        return self._unavailable(self._failed[1])

    def _check_breaker(self) -> None:
        failed = self._failed
        if failed is not None and time.monotonic() - failed[0] < self.RETRY_AFTER_S:
            raise self._unavailable(failed[1])

    def get(self):  # noqa: ANN201 - kafka.KafkaProducer
        """The producer, connecting on first use; `Unavailable` while Kafka is known down."""
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        if self._producer is not None:
            return self._producer
        self._check_breaker()
        # One thread connects; the others wait at most one budget, never a queue of timeouts.
        if not self._lock.acquire(timeout=self.SEND_BUDGET_S):
            raise self._unavailable("still connecting")
        try:
            self._check_breaker()
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(bootstrap_servers=self.bootstrap,
                                                   **self.CONFIG)
                except KafkaError as exc:
                    raise self._fail(exc) from exc
                self._failed = None
            return self._producer
        finally:
            self._lock.release()

    def send(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        """Send and wait for every acknowledgement within the budget, else `Unavailable`."""
        from kafka.errors import KafkaError

        self._check_breaker()
        kafka = self.get()
        deadline = time.monotonic() + self.SEND_BUDGET_S
        try:
            futures = [kafka.send(topic, key=key, value=value) for key, value in records]
            for f in futures:
                f.get(timeout=max(0.0, deadline - time.monotonic()))
        except KafkaError as exc:
            # Start from a fresh producer on the next try: one that lost its broker can be left
            # in a state it never leaves (a restarted broker forgot its producer id).
            self._discard(kafka)
            raise self._fail(exc) from exc
        self._failed = None

    def _discard(self, kafka: object) -> None:
        with self._lock:
            if self._producer is kafka:
                self._producer = None
        self._close(kafka, timeout=0)

    @staticmethod
    def _close(kafka: object, timeout: float) -> None:
        from kafka.errors import KafkaError

        try:
            kafka.close(timeout=timeout)  # type: ignore[attr-defined]
        except KafkaError as exc:  # records it could not deliver were already answered 503
            log.warning("closing the Kafka producer: %s", exc)

    def close(self) -> None:
        if self._producer is not None:
            self._close(self._producer, timeout=5)


class Guard:
    """Pure ASGI middleware: body-size limit (413) and latency / in-flight metrics per route."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _reply(send, 413, f"request body over {self.max_body} bytes")
            return
        status = {"code": 500}
        seen = {"bytes": 0, "too_large": False, "replied": False}

        async def reply_413() -> None:
            if not seen["replied"]:
                seen["replied"] = True
                status["code"] = 413
                await _reply(send, 413, f"request body over {self.max_body} bytes")

        async def limited_receive() -> Message:
            msg = await receive()
            seen["bytes"] += len(msg.get("body", b""))
            if seen["bytes"] > self.max_body:  # chunked bodies without a length
                seen["too_large"] = True
                raise BodyTooLarge
            return msg

        async def capture(msg: Message) -> None:
            if seen["too_large"]:
                # FastAPI turns any error while reading the body into its own 400; the client
                # must see the 413 instead, and exactly one response.
                if msg["type"] == "http.response.start":
                    await reply_413()
                return
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        metrics.IN_FLIGHT.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, limited_receive, capture)
        except BodyTooLarge:
            await reply_413()
        finally:
            metrics.IN_FLIGHT.dec()
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.REQUEST_SECONDS.labels(path, scope["method"], str(status["code"])).observe(
                time.perf_counter() - t0)


class BodyTooLarge(Exception):
    pass


async def _reply(send: Send, status: int, detail: str) -> None:
    body = error_body(detail)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServiceSettings = app.state.settings
    torch.set_num_threads(settings.torch_threads)
    switch_s = sys.getswitchinterval()  # process-wide: put back at shutdown (tests run many apps)
    sys.setswitchinterval(settings.gil_switch_ms / 1000)
    if not log.handlers:  # uvicorn configures its own loggers only
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(settings.log_level.upper())
    client = settings.redis_client()
    features = FeatureStore(client, settings.namespace)
    weights = WeightStore(client, settings.require_hmac_key(), settings.namespace)
    holder = ModelHolder(weights, features, TextEncoder(settings.encoder_path),
                         settings.poll_interval_s, item_dtype=settings.item_dtype,
                         ann=AnnSettings(settings.ann_min_items, settings.ann_nprobe,
                                         settings.ann_recall, settings.scan_min_items,
                                         rebuild_s=settings.ann_rebuild_s,
                                         monitor_s=settings.ann_monitor_s))
    app.state.features = features
    app.state.holder = holder
    app.state.batcher = Batcher(settings.max_batch)
    app.state.recent = RecentEvents(settings.recent_events_s)
    app.state.ranking = Ranking(holder, UserReads(settings.redis_async_client(),
                                                  settings.namespace),
                                app.state.batcher, UserCache(settings.user_cache_size),
                                app.state.recent, RedisBreaker(trial_s=settings.redis_timeout_s))
    app.state.producer = LazyProducer(settings.kafka_bootstrap)
    try:
        holder.refresh()  # serve the newest version from the first request, if Redis is up
    except redis.exceptions.RedisError as exc:
        log.warning("redis unavailable at startup (%s); will keep trying", exc)
    freeze_long_lived("startup")
    holder.start()
    with metrics.GcPauses():
        yield
    holder.stop()
    app.state.batcher.close()
    await app.state.ranking.reads.r.aclose()
    app.state.producer.close()
    sys.setswitchinterval(switch_s)


def _finite(value: object) -> object:
    """JSON has no NaN/Infinity: show such floats as strings (e.g. an echoed `ts: NaN` input)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422, except that a NaN in the offending input no longer turns it into a 500
    (its default handler echoes the input, and JSON cannot encode NaN)."""
    return JSONResponse(status_code=422, content={"detail": _finite(jsonable_encoder(exc.errors()))})


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The app factory; uvicorn uses `service.app:app`, tests pass their own settings."""
    settings = settings or ServiceSettings()
    app = FastAPI(title="freshrec", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_middleware(Guard, max_body=settings.max_body_bytes)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn service.app:app` builds the app on first access, never at import time.
    if name == "app":
        return create_app()
    raise AttributeError(name)
