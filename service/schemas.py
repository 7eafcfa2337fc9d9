"""Request and response bodies, with the bounds that keep bad input a clear 4xx."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class EventIn(BaseModel):
    """An interaction. Unknown fields are kept and travel on to Kafka."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    user_id: Id
    item_id: Id
    event: Annotated[str, StringConstraints(min_length=1, max_length=32)] = "click"
    ts: float = Field(ge=0, description="event time, epoch seconds")


class ItemIn(BaseModel):
    """A catalog item; `text` is what the item tower reads. Unknown fields are kept."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    item_id: Id
    text: Annotated[str, StringConstraints(min_length=1, max_length=8192)]


class RecommendIn(BaseModel):
    """Anonymous recommendation from an explicit history (oldest first)."""

    history: list[Id] = Field(default_factory=list, max_length=200)
    k: int = Field(10, ge=1, le=100)
    exclude: list[Id] = Field(default_factory=list, max_length=1000)
    exclude_history: bool = True


class Scored(BaseModel):
    item_id: str
    score: float
    text: str | None = None


class RecommendOut(BaseModel):
    user_id: str | None
    items: list[Scored]
    model_version: int
    history_used: int
    source: str  # "model" or "popularity" (no verified version yet)
    stale_features: bool = False  # Redis was unreachable: last known history used


class Accepted(BaseModel):
    accepted: int
    topic: str


class ModelOut(BaseModel):
    version: int
    parent: int | None = None
    kind: str | None = None
    created_at: float | None = None
    age_seconds: float | None = None
    encoder: str | None = None
    trained_through: dict[str, Any] = Field(default_factory=dict)
    swaps: int
    refused_versions: dict[int, str] = Field(default_factory=dict)
    catalog_items: int


class RollbackIn(BaseModel):
    """Serve this stored version again; the trainer continues from it."""

    version: int = Field(ge=1)


class RollbackOut(BaseModel):
    version: int  # now served (the API follows within a poll interval)
    previous: int | None  # the version the pointer named before
    token: int  # the fencing token the publisher lease moved on to
    epoch: str
