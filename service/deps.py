"""Dependencies: what a route needs, as Annotated aliases. Built once in the app's lifespan.

Every dependency here is `async def` although none awaits anything: FastAPI runs a plain `def`
dependency on its thread pool, one round trip each, so /recommend's six took six thread
hand-offs per request before its own (2026-12-01, 100k items at 200 req/s: the event loop held
the GIL 57% of the time, waking worker threads its largest single cost). They only read
`app.state` or compare a token, so they run on the event loop at once."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from protocol.features import UserReads, UserView
from service.batcher import Batcher
from service.holder import ModelHolder
from service.settings import ServiceSettings


class UserCache:
    """Last known view (history, bounded seen ids) per user: what we serve while Redis is
    unreachable."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[str, UserView] = OrderedDict()

    def put(self, user: str, state: UserView) -> None:
        self._d[user] = state
        self._d.move_to_end(user)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def get(self, user: str) -> UserView:
        return self._d.get(user, UserView([], set()))


class RedisBreaker:
    """Requests stop waiting on a Redis that does not answer.

    With Redis paused or partitioned, each /recommend used to wait out the client's timeout
    (2 s) before serving the user's last known history; at 200 req/s those waits filled the
    thread pool and every request queued behind them (3.4-4.7 s in `freshrec bench chaos`).
    On the event loop a waiting request holds no thread, but still waits out the timeout.
    After a Redis error, requests serve from the user cache at once for `open_s`; then one
    request at a time tries Redis again (the others keep serving from the cache for up to
    `trial_s`, the timeout), and the first success closes the breaker."""

    def __init__(self, open_s: float = 1.0, trial_s: float = 2.0) -> None:
        self.open_s, self.trial_s = open_s, trial_s
        self._until = 0.0  # monotonic time before which requests skip Redis; 0: closed
        self._lock = threading.Lock()

    def allow(self, now: float) -> bool:
        with self._lock:
            if now < self._until:
                return False
            if self._until:
                self._until = now + self.trial_s  # this request is the one trying again
            return True

    def failed(self, now: float) -> None:
        with self._lock:
            self._until = now + self.open_s

    def succeeded(self) -> None:
        with self._lock:
            self._until = 0.0


class RecentEvents:
    """Events this replica accepted in the last `ttl_s` seconds, per user: read-your-writes.

    The features consumer applies an accepted event to Redis some milliseconds later (more under
    load); a ranking asked for in between would miss the user's newest item, the strongest
    signal there is (measured: 5% of HR@10 at 200 events/s, bench/RESULTS.md). `merge` appends
    the accepted events that the stored history does not end with yet. Bounded: `users` users,
    `per_user` events each; a user's events that reach Redis through another replica are
    unknown here (put replicas behind sticky sessions for read-your-writes across them)."""

    def __init__(self, ttl_s: float, users: int = 100_000, per_user: int = 20) -> None:
        self.ttl_s, self.users, self.per_user = ttl_s, users, per_user
        self._d: OrderedDict[str, list[tuple[str, float]]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user: str, item: str, now: float) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            events = self._d.setdefault(user, [])
            events.append((item, now))
            del events[: -self.per_user]
            self._d.move_to_end(user)
            while len(self._d) > self.users:
                self._d.popitem(last=False)

    def merge(self, user: str, view: UserView, now: float) -> UserView:
        """`view` plus the user's accepted events it does not show yet."""
        with self._lock:
            recent = [item for item, t in self._d.get(user, ()) if now - t <= self.ttl_s]
        if not recent:
            return view
        hist = view.history
        applied = max((j for j in range(len(recent), 0, -1) if hist[-j:] == recent[:j]),
                      default=0)  # the accepted events the stored history already ends with
        missing = recent[applied:]
        if not missing:
            return view
        return UserView(hist + missing, view.seen | set(missing), view.complete)


@dataclass(frozen=True)
class Ranking:
    """What a /recommend request uses, as one dependency: FastAPI resolves each dependency of
    a route apart (in a bare FastAPI app here, six cost ~0.1 ms of CPU a request more than
    one; in the API the difference is inside run-to-run noise: bench/RESULTS.md, "Issue 8,
    session 12")."""

    holder: ModelHolder
    reads: UserReads
    batcher: Batcher
    cache: UserCache
    recent: RecentEvents
    breaker: RedisBreaker


async def get_ranking(request: Request) -> Ranking:
    return request.app.state.ranking


async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


async def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


async def get_recent(request: Request) -> RecentEvents:
    return request.app.state.recent


async def get_producer(request: Request):  # noqa: ANN201 - a service.app.LazyProducer
    # Not connected here: a dependency runs before body validation, so connecting here made bad
    # input answer 503 (not 422) whenever Kafka was down. Routes call .get() after validation.
    return request.app.state.producer


async def require_token(settings: Annotated[ServiceSettings, Depends(get_settings)],
                  authorization: Annotated[str | None, Header()] = None) -> None:
    """Write endpoints need `Authorization: Bearer $FRESHREC_API_TOKEN`."""
    _check_bearer(settings.api_token.get_secret_value(), "FRESHREC_API_TOKEN", authorization)


async def require_admin(settings: Annotated[ServiceSettings, Depends(get_settings)],
                  authorization: Annotated[str | None, Header()] = None) -> None:
    """Admin endpoints need `Authorization: Bearer $FRESHREC_ADMIN_TOKEN`: a token of its own,
    so that a producer that may write events cannot roll the model back."""
    _check_bearer(settings.admin_token.get_secret_value(), "FRESHREC_ADMIN_TOKEN", authorization)


def _check_bearer(token: str, variable: str, authorization: str | None) -> None:
    if not token:
        raise HTTPException(503, f"these endpoints are disabled: set {variable}")
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
HolderDep = Annotated[ModelHolder, Depends(get_holder)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
RankingDep = Annotated[Ranking, Depends(get_ranking)]
RecentDep = Annotated[RecentEvents, Depends(get_recent)]
ProducerDep = Annotated[object, Depends(get_producer)]
Authorized = Depends(require_token)
AdminAuthorized = Depends(require_admin)
