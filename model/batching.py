"""When the trainer takes a step and when it publishes: micro-batches closed by size or by time,
whichever comes first; a publish at most every interval.

The same rule drives the live trainer (`consumers/trainer.py`, with the poll clock) and the
offline benchmark (`arrival_polls`, with a simulated arrival clock at a stated event rate), so
the two learn from identically shaped micro-batches (tests/test_bench_trainer_equivalence.py
feeds both the same events and compares the weights). How a small micro-batch is learned
(lr-scaled) is the learner's business: `ModelConfig.step_events`.
"""

from __future__ import annotations

import math
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

    def take_due(self, now: float) -> list[list[T]]:
        """Every micro-batch due at `now`, oldest first."""
        out = []
        while self.due(now):
            out.append(self.take())
        return out

    def closes_at(self) -> float:
        """The first clock time at which the open micro-batch's window has run out."""
        t = self.opened + self.policy.window_s
        while t - self.opened < self.policy.window_s:  # the sum rounded down
            t = math.nextafter(t, math.inf)
        return t

    def waiting(self) -> list[T]:
        """Every record not taken yet, oldest first."""
        return [r for batch in self.closed for r in batch] + self.records

    def _expired(self, now: float) -> bool:
        return bool(self.records) and now - self.opened >= self.policy.window_s

    def _close(self) -> list[T]:
        out, self.records = self.records, []
        return out


# A trainer behind by L seconds publishes at most every L / BACKLOG_STRETCH seconds, and at most
# BACKLOG_STRETCH intervals apart (see `publish_due`)
BACKLOG_STRETCH = 4


def publish_due(now: float, last_publish: float, interval_ms: float, behind_s: float = 0.0
                ) -> bool:
    """Whether `interval_ms` has passed since the last publish (or refusal). The trainer asks
    after every poll, if it learned anything since; the benchmark after every simulated one.

    `behind_s`: how long ago the newest event the trainer polled was produced. While it is
    behind (a burst, a restart's backlog) the interval stretches to a quarter of that, at most
    4x: a version then waits at most a quarter of the delay its events already carry, and the
    gating and publishing of versions stale anyway (a fifth of the trainer's time at 4 versions
    a second) goes to catching up. Caught up (behind less than 4 intervals), nothing changes."""
    interval = max(interval_ms, min(BACKLOG_STRETCH * interval_ms,
                                    1000 * behind_s / BACKLOG_STRETCH))
    return (now - last_publish) * 1000 >= interval


def arrival_polls(records: Sequence[T], rate: float, policy: BatchPolicy
                  ) -> Iterator[tuple[float, list[list[T]]]]:
    """The trainer's polls if `records` arrived evenly at `rate` per second, one record each:
    (the poll's clock time, the micro-batches it closed).

    Record i arrives at i / rate and is handed to a `MicroBatcher` as `Trainer.on_poll` hands
    it a poll (`add`, then `take_due`); a last, empty poll closes the micro-batch still open
    the moment its window runs out.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive events/s, got {rate}")
    batcher: MicroBatcher[T] = MicroBatcher(policy)
    for i, record in enumerate(records):
        now = i / rate
        batcher.add([record], now)
        yield now, batcher.take_due(now)
    if len(batcher):
        now = batcher.closes_at()
        yield now, batcher.take_due(now)


def arrival_batches(records: Sequence[T], rate: float, policy: BatchPolicy) -> Iterator[list[T]]:
    """The micro-batches of `arrival_polls`, in order."""
    for _, batches in arrival_polls(records, rate, policy):
        yield from batches
