"""When the trainer takes a step: micro-batches closed by size or by time, whichever comes first.

The same rule drives the live trainer (`consumers/trainer.py`, with the poll clock) and the
offline benchmark (`arrival_batches`, with a simulated arrival clock at a stated event rate), so
the two learn from identically shaped micro-batches (tests/test_bench_trainer_equivalence.py
feeds both the same events and compares the weights). How a small micro-batch is learned
(lr-scaled) is the learner's business: `ModelConfig.step_events`.
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
    """Cuts records into micro-batches on the caller's clock; pure bookkeeping, so tests and
    simulations drive it exactly.

    The rule, for records that arrived at `now` (a poll's worth): the open micro-batch closes
    first if its window ran out (they arrived after it closed), then they join one at a time,
    a micro-batch closing the moment it holds `max_events`, however large the poll. Callers
    then learn what is due: `add(records, now)`, and `take()` while `due(now)`.
    """

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self.records: list[T] = []  # the open micro-batch
        self.closed: list[list[T]] = []  # closed micro-batches not taken yet, oldest first
        self.opened = 0.0  # clock time of the first record of the open micro-batch

    def __len__(self) -> int:
        return len(self.records) + sum(map(len, self.closed))

    def add(self, records: Sequence[T], now: float) -> None:
        """Records that arrived at `now` (a poll's worth)."""
        if self._expired(now):
            self.closed.append(self._close())
        for record in records:
            if not self.records:
                self.opened = now
            self.records.append(record)
            if len(self.records) >= self.policy.max_events:
                self.closed.append(self._close())

    def due(self, now: float) -> bool:
        """A micro-batch is full, or the open one's first record has waited a whole window."""
        return bool(self.closed) or self._expired(now)

    def take(self) -> list[T]:
        """The oldest closed micro-batch, else the open one (a new one then starts empty)."""
        return self.closed.pop(0) if self.closed else self._close()

    def waiting(self) -> list[T]:
        """Every record not taken yet, oldest first."""
        return [r for batch in self.closed for r in batch] + self.records

    def _expired(self, now: float) -> bool:
        return bool(self.records) and now - self.opened >= self.policy.window_s

    def _close(self) -> list[T]:
        out, self.records = self.records, []
        return out


def arrival_batches(records: Sequence[T], rate: float, policy: BatchPolicy) -> Iterator[list[T]]:
    """The micro-batches a trainer would learn if `records` arrived evenly at `rate` per second.

    Record i arrives at i / rate and is handed to a `MicroBatcher` exactly as the trainer hands
    it a poll (`consumers/trainer.py`): `add`, then `take` while `due`; the last, still open
    micro-batch comes last.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive events/s, got {rate}")
    batcher: MicroBatcher[T] = MicroBatcher(policy)
    for i, record in enumerate(records):
        now = i / rate
        batcher.add([record], now)
        while batcher.due(now):
            yield batcher.take()
    if len(batcher):
        yield batcher.take()
