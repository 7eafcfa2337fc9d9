"""Reservoir replay: a uniform sample of every training example seen so far (Vitter's R)."""

from __future__ import annotations

import random
from typing import Generic, TypeVar

T = TypeVar("T")


class Reservoir(Generic[T]):
    """Keeps `capacity` examples, each past example equally likely to be kept."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.items: list[T] = []
        self.seen = 0
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, example: T) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(example)
            return
        j = self._rng.randrange(self.seen)
        if j < self.capacity:
            self.items[j] = example

    def sample(self, n: int) -> list[T]:
        """Up to n examples drawn without replacement."""
        n = min(n, len(self.items))
        return self._rng.sample(self.items, n) if n else []
