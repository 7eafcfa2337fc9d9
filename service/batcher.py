"""Batching of concurrent /recommend requests into one scan of the item matrix (issue 8).

A top-k over N items is one pass over an (N, w) matrix: memory-bound, so scoring B queued
queries in one (B, w) x (w, N) product costs little more than one (bench/RESULTS.md, "Batching
concurrent requests"). Requests are coroutines on the API's event loop; scans run on one thread
of their own, the ranker, so the loop goes on reading requests and Redis while one runs. No
timer: a request that finds the ranker idle is scanned at once (a batch of 1, the exact path the
learner ranks with); requests that arrive during a scan queue, and when it ends everything
queued by then is the next batch. So an idle server adds no wait, a busy one batches by as many
as the scans take long, and a request costs no thread hand-off of its own: one per batch. (A
route on FastAPI's thread pool took two per request, and the leader/follower batching of pool
threads it replaced woke every follower in turn: bench/RESULTS.md, "Issue 8, session 12".)

Requests are grouped by Scorer (a swap between two arrivals gives two groups, each request is
served wholly by the Scorer it read); one group asks for the largest n among its requests and
each gets its own prefix. An exception in a group is raised in every request of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

from model.scorer import Scorer

Ranked = list[tuple[str, float]]


class _Job:
    __slots__ = ("scorer", "history", "n", "exclude", "future", "result", "error")

    def __init__(self, scorer: Scorer, history: Sequence[str], n: int,
                 exclude: Collection[str], future: asyncio.Future[Ranked]) -> None:
        self.scorer, self.history, self.n, self.exclude = scorer, history, n, exclude
        self.future = future
        self.result: Ranked | None = None
        self.error: BaseException | None = None


class Batcher:
    """Batches `Scorer.rank_batch` calls of concurrent requests on one event loop."""

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max(1, max_batch)
        self._queue: list[_Job] = []
        self._busy = False  # a batch is on the ranker
        self._ranker = ThreadPoolExecutor(1, thread_name_prefix="ranker")
        self.batches = 0  # scans run (groups), for the metrics and the tests
        self.requests = 0

    async def rank(self, scorer: Scorer, history: Sequence[str], n: int,
                   exclude: Collection[str]) -> Ranked:
        """Top-n of `scorer` for one history, minus `exclude`: what
        `scorer.rank_batch([history], n, [exclude])[0]` returns, scored with whatever else is
        queued."""
        loop = asyncio.get_running_loop()
        job = _Job(scorer, history, n, exclude, loop.create_future())
        self._queue.append(job)
        if not self._busy:
            self._next(loop)
        return await job.future

    def close(self) -> None:
        """Stop the ranker thread once the batch on it (if any) is done."""
        self._ranker.shutdown(wait=False)

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand what is queued (at most `max_batch`) to the ranker, or go idle; on the loop."""
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
        self._busy = bool(batch)
        if not batch:
            return
        try:
            scan = loop.run_in_executor(self._ranker, self._score_all, batch)
        except RuntimeError as exc:  # the ranker was shut down (the app is stopping)
            for job in batch:
                job.error = exc
            self._finished(loop, batch)
            return
        scan.add_done_callback(lambda done: self._finished(loop, batch, done))

    def _finished(self, loop: asyncio.AbstractEventLoop, batch: list[_Job],
                  scan: asyncio.Future[None] | None = None) -> None:
        failure = None if scan is None or scan.cancelled() else scan.exception()
        for job in batch:
            if job.future.done():  # the request was cancelled (its client went away)
                continue
            if job.result is not None and job.error is None:
                job.future.set_result(job.result)
            else:  # its group failed, or the scan ended before reaching it
                job.future.set_exception(
                    job.error or failure or RuntimeError("the ranker ended a batch without a ranking"))
        self._next(loop)

    def _score_all(self, batch: list[_Job]) -> None:
        """On the ranker thread: one `rank_batch` per Scorer among the batch's requests."""
        groups: dict[int, list[_Job]] = {}
        for job in batch:
            groups.setdefault(id(job.scorer), []).append(job)
        for jobs in groups.values():
            self._score(jobs)

    def _score(self, jobs: list[_Job]) -> None:
        n = max(job.n for job in jobs)
        try:
            ranked = jobs[0].scorer.rank_batch([job.history for job in jobs], n,
                                               [job.exclude for job in jobs])
        except Exception as exc:  # noqa: BLE001 - raised again in each request
            for job in jobs:
                job.error = exc
        else:
            for job, got in zip(jobs, ranked, strict=True):
                job.result = got[: job.n]
        self.batches += 1
        self.requests += len(jobs)
