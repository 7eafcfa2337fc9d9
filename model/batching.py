"""When the trainer takes a step: micro-batches closed by size or by time, whichever comes first.

The same rule drives the live trainer (`consumers/trainer.py`, with the poll clock) and the
offline benchmark (`arrival_batches`, with a simulated arrival clock at a stated event rate), so
the two learn from identically shaped micro-batches and cannot diverge silently. How a small
micro-batch is learned (padded and lr-scaled) is the learner's business: `ModelConfig.step_events`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """A micro-batch closes at `max_events` or `window_s` after its first event."""

    max_events: int = 256  # close at this many events ...
    window_s: float = 0.15  # ... or this long after the first one arrived

    def __post_init__(self) -> None:
        if self.max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {self.max_events}")
        if self.window_s < 0:
            raise ValueError(f"window_s must be >= 0 seconds, got {self.window_s}")


class MicroBatcher(Generic[T]):
    """Accumulates records; `due(now)` says the micro-batch should be learned now.

    Pure bookkeeping: the caller supplies the clock, so tests and simulations drive it exactly.
    """

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self.records: list[T] = []
        self.opened = 0.0  # clock time of the first record of the open micro-batch

    def __len__(self) -> int:
        return len(self.records)

    def add(self, records: Sequence[T], now: float) -> None:
        """Records that arrived at `now` (a poll's worth)."""
        if records and not self.records:
            self.opened = now
        self.records.extend(records)

    def due(self, now: float) -> bool:
        """Full, or its first record has waited a whole window."""
        return bool(self.records) and (len(self.records) >= self.policy.max_events
                                       or now - self.opened >= self.policy.window_s)

    def take(self) -> list[T]:
        """The open micro-batch; a new one starts empty."""
        out, self.records = self.records, []
        return out


def arrival_batches(records: Sequence[T], rate: float, policy: BatchPolicy) -> Iterator[list[T]]:
    """The micro-batches a trainer would close if `records` arrived evenly at `rate` per second.

    Record i arrives at i / rate; a batch closes when full or `window_s` after its first record
    (taking every record that arrived by then), as `MicroBatcher` does on a poll clock.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive events/s, got {rate}")
    batcher: MicroBatcher[T] = MicroBatcher(policy)
    for i, record in enumerate(records):
        now = i / rate
        if batcher.due(now):  # the window ran out before this record arrived
            yield batcher.take()
        batcher.add([record], now)
        if len(batcher) >= policy.max_events:
            yield batcher.take()
    if batcher.records:
        yield batcher.take()
