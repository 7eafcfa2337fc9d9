"""The FastAPI application: settings, stores and the model holder are built in the lifespan."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import torch
from fastapi import FastAPI
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

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer = None
        self._lock = threading.Lock()

    def get(self):  # noqa: ANN201 - kafka.KafkaProducer
        from fastapi import HTTPException
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        with self._lock:
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                                   linger_ms=2, request_timeout_ms=5000,
                                                   max_block_ms=5000)
                except KafkaError as exc:
                    raise HTTPException(503, f"Kafka is unavailable: {exc}") from exc
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
        seen = {"bytes": 0}

        async def limited_receive() -> Message:
            msg = await receive()
            seen["bytes"] += len(msg.get("body", b""))
            if seen["bytes"] > self.max_body:  # chunked bodies without a length
                raise BodyTooLarge
            return msg

        async def capture(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        metrics.IN_FLIGHT.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, limited_receive, capture)
        except BodyTooLarge:
            status["code"] = 413
            await _reply(send, 413, f"request body over {self.max_body} bytes")
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


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The app factory; uvicorn uses `service.app:app`, tests pass their own settings."""
    settings = settings or ServiceSettings()
    app = FastAPI(title="freshrec", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.include_router(router)
    app.add_middleware(Guard, max_body=settings.max_body_bytes)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn service.app:app` builds the app on first access, never at import time.
    if name == "app":
        return create_app()
    raise AttributeError(name)
