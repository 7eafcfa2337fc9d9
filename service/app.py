"""The FastAPI application: settings, stores and the model holder are built in the lifespan."""

from __future__ import annotations

import logging
import math
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
from protocol.features import FeatureStore
from protocol.weights import WeightStore
from service import metrics
from service.deps import UserCache
from service.holder import ModelHolder
from service.routes import error_body, router
from service.settings import ServiceSettings

log = logging.getLogger("freshrec.service")


class LazyProducer:
    """A Kafka producer created on first use, so the API starts (and serves) without Kafka."""

    RETRY_AFTER_S = 5.0  # after a failed connect, answer 503 at once for this long

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer = None
        self._lock = threading.Lock()
        self._failed: tuple[float, str] | None = None  # (monotonic time, error) of the last try

    def _recent_failure(self):  # noqa: ANN202
        from fastapi import HTTPException

        failed = self._failed
        if failed is not None and time.monotonic() - failed[0] < self.RETRY_AFTER_S:
            return HTTPException(503, f"Kafka is unavailable: {failed[1]}",
                                 headers={"Retry-After": str(int(self.RETRY_AFTER_S))})
        return None

    def get(self):  # noqa: ANN201 - kafka.KafkaProducer
        from fastapi import HTTPException
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        if self._producer is not None:
            return self._producer
        # Fail fast while Kafka is known to be down: otherwise every write request would queue
        # on the lock for a full bootstrap timeout and pin the worker threads /recommend needs.
        if (exc := self._recent_failure()) is not None:
            raise exc
        with self._lock:
            if (exc := self._recent_failure()) is not None:
                raise exc
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                                   linger_ms=2, request_timeout_ms=5000,
                                                   max_block_ms=5000, bootstrap_timeout_ms=5000)
                except KafkaError as exc:
                    self._failed = (time.monotonic(), str(exc) or type(exc).__name__)
                    raise HTTPException(503, f"Kafka is unavailable: {exc}",
                                        headers={"Retry-After": str(int(self.RETRY_AFTER_S))}
                                        ) from exc
                self._failed = None
            return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


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
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    features = FeatureStore(client, settings.namespace)
    weights = WeightStore(client, settings.require_hmac_key(), settings.namespace)
    holder = ModelHolder(weights, features, TextEncoder(settings.encoder_path),
                         settings.poll_interval_s)
    app.state.features = features
    app.state.holder = holder
    app.state.user_cache = UserCache(settings.user_cache_size)
    app.state.producer = LazyProducer(settings.kafka_bootstrap)
    try:
        holder.refresh()  # serve the newest version from the first request, if Redis is up
    except redis.exceptions.RedisError as exc:
        log.warning("redis unavailable at startup (%s); will keep trying", exc)
    holder.start()
    yield
    holder.stop()
    app.state.producer.close()


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
