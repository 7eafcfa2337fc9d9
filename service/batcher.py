"""Batching of concurrent /recommend requests into one scan of the item matrix (issue 8).

A top-k over N items is one pass over an (N, w) matrix: memory-bound, so scoring B queued
queries in one (B, w) x (w, N) product costs little more than one (bench/RESULTS.md, "Batching
concurrent requests"). No timer and no thread of its own: the first request to find the batcher
idle leads; requests that arrive while a scan runs queue, and when it ends the leader hands
leadership to the oldest of them, which scores everything queued by then as one batch. So an
idle server answers a lone request at once (batch of 1, the exact path the learner ranks with),
and a busy one batches "whatever is queued", by as many as the scans take long.

Requests are grouped by Scorer (a swap between two arrivals gives two groups, each request is
served wholly by the Scorer it read) and by exclusion-set-size-agnostic `rank_batch` calls; one
batch asks for the largest n among its requests and each gets its own prefix. An exception in a
batch is raised in every request of it.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

from model.scorer import Scorer

Ranked = list[tuple[str, float]]


class _Job:
    __slots__ = ("scorer", "history", "n", "exclude", "done", "lead", "result", "error")

    def __init__(self, scorer: Scorer, history: Sequence[str], n: int,
                 exclude: Collection[str]) -> None:
        self.scorer, self.history, self.n, self.exclude = scorer, history, n, exclude
        self.done = threading.Event()
        self.lead = False  # woken to lead the next batch rather than with a result
        self.result: Ranked | None = None
        self.error: BaseException | None = None


class Batcher:
    """Leader/follower batching of `Scorer.rank_batch` calls from concurrent request threads."""

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._busy = False
        self.batches = 0  # scans run (groups), for the metrics and the tests
        self.requests = 0

    def rank(self, scorer: Scorer, history: Sequence[str], n: int,
             exclude: Collection[str]) -> Ranked:
        """Top-n of `scorer` for one history, minus `exclude`: what
        `scorer.rank_batch([history], n, [exclude])[0]` returns, scored with whatever else is
        queued."""
        job = _Job(scorer, history, n, exclude)
        with self._lock:
            self._queue.append(job)
            lead = not self._busy
            self._busy = True
        if not lead:
            job.done.wait()
            if not job.lead:
                return self._result(job)
        self._lead()
        return self._result(job)

    @staticmethod
    def _result(job: _Job) -> Ranked:
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _lead(self) -> None:
        """Score everything queued now (including this thread's own request), then pass the
        lead to the oldest request that queued meanwhile, or go idle."""
        with self._lock:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
        groups: dict[int, list[_Job]] = {}
        for job in batch:
            groups.setdefault(id(job.scorer), []).append(job)
        for jobs in groups.values():
            self._score(jobs)
        with self._lock:
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._busy = False
            else:
                nxt.lead = True
        for job in batch:
            job.done.set()
        if nxt is not None:
            nxt.done.set()

    def _score(self, jobs: list[_Job]) -> None:
        n = max(job.n for job in jobs)
        try:
            ranked = jobs[0].scorer.rank_batch([job.history for job in jobs], n,
                                               [job.exclude for job in jobs])
        except BaseException as exc:  # noqa: BLE001 - raised again in each request's thread
            for job in jobs:
                job.error = exc
        else:
            for job, got in zip(jobs, ranked, strict=True):
                job.result = got[: job.n]
        self.batches += 1
        self.requests += len(jobs)
