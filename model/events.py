"""The two records the whole system speaks: an interaction and an item.

They are plain frozen dataclasses so that `model/` stays free of any transport: consumers decode
Kafka JSON into these, the benchmark builds them from MovieLens files, and the learner never
mutates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Interaction:
    """One user-item event. `ts` is the event time in epoch seconds."""

    user_id: str
    item_id: str
    ts: float
    event: str = "click"


@dataclass(frozen=True)
class Item:
    """A catalog entry. `text` is what the item tower reads; `fields` keeps everything else."""

    item_id: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
