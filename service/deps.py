"""Dependencies: what a route needs, as Annotated aliases. Built once in the app's lifespan."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from protocol.features import FeatureStore, UserView
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


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


def get_features(request: Request) -> FeatureStore:
    return request.app.state.features


def get_user_cache(request: Request) -> UserCache:
    return request.app.state.user_cache


def get_producer(request: Request):  # noqa: ANN201 - a service.app.LazyProducer
    # Not connected here: a dependency runs before body validation, so connecting here made bad
    # input answer 503 (not 422) whenever Kafka was down. Routes call .get() after validation.
    return request.app.state.producer


def require_token(settings: Annotated[ServiceSettings, Depends(get_settings)],
                  authorization: Annotated[str | None, Header()] = None) -> None:
    """Write endpoints need `Authorization: Bearer $FRESHREC_API_TOKEN`."""
    token = settings.api_token.get_secret_value()
    if not token:
        raise HTTPException(503, "write endpoints are disabled: set FRESHREC_API_TOKEN")
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
HolderDep = Annotated[ModelHolder, Depends(get_holder)]
FeaturesDep = Annotated[FeatureStore, Depends(get_features)]
UserCacheDep = Annotated[UserCache, Depends(get_user_cache)]
ProducerDep = Annotated[object, Depends(get_producer)]
Authorized = Depends(require_token)
