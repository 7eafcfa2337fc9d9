"""The Kafka wire format: validation of interaction and item records, and topic creation.

Bad records and good records part ways here (`oks` / `errs`), so the DLQ is a normal path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from model.events import Interaction, Item
from protocol.errors import InvalidRecord

MAX_RECORD_BYTES = 64 * 1024
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 8 * 1024


@dataclass(frozen=True)
class Source:
    """Where a record came from: enough to put it in the DLQ and to commit past it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # broker/producer timestamp: the produce time used for freshness


def _check_id(payload: dict[str, Any], name: str) -> str:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRecord("bad_field", f"{name} must be a string or an integer")
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS:
        raise InvalidRecord("bad_field", f"{name} must have 1..{MAX_ID_CHARS} characters")
    return text


def _load(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise InvalidRecord("empty", "record has no value")
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidRecord("too_large", f"record is {len(raw)} bytes, limit {MAX_RECORD_BYTES}")
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRecord("bad_json", str(exc)) from exc
    if not isinstance(payload, dict):
        raise InvalidRecord("bad_json", "value must be a JSON object")
    return payload


def parse_interaction(payload: dict[str, Any]) -> Interaction:
    """Validate an interaction dict (from Kafka or HTTP)."""
    ts = payload.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise InvalidRecord("bad_field", "ts must be a finite, non-negative epoch time in seconds")
    event = payload.get("event", "click")
    if not isinstance(event, str) or not 0 < len(event) <= 32:
        raise InvalidRecord("bad_field", "event must be a short string such as 'click'")
    return Interaction(_check_id(payload, "user_id"), _check_id(payload, "item_id"), float(ts),
                       event)


def parse_item(payload: dict[str, Any]) -> Item:
    """Validate an item dict (from Kafka or HTTP); unknown fields are kept."""
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
        raise InvalidRecord("bad_field", f"text must be a non-empty string of at most "
                                         f"{MAX_TEXT_CHARS} characters")
    fields = {k: v for k, v in payload.items() if k not in ("item_id", "text")}
    return Item(_check_id(payload, "item_id"), text, fields)


def decode_interaction(raw: bytes | None) -> Interaction:
    return parse_interaction(_load(raw))


def decode_item(raw: bytes | None) -> Item:
    return parse_item(_load(raw))


def encode_interaction(e: Interaction, extra: dict[str, Any] | None = None) -> bytes:
    body = {**(extra or {}), "user_id": e.user_id, "item_id": e.item_id, "event": e.event,
            "ts": e.ts}
    return json.dumps(body, separators=(",", ":")).encode()


def encode_item(item: Item) -> bytes:
    body = {**item.fields, "item_id": item.item_id, "text": item.text}
    return json.dumps(body, separators=(",", ":")).encode()


def ensure_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    """Create the topics if missing (idempotent)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="freshrec-admin",
                             request_timeout_ms=10_000)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
