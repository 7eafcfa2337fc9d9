"""Batched ranking (service/batcher.py): requests that queue while a scan runs are scored in
one batch, each gets what a request of its own gets (same items, scores within float rounding),
a swap between arrivals never mixes Scorers, an error reaches every request of its batch, and
the scans run off the event loop (it goes on serving while one runs)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from model.config import ModelConfig
from model.scorer import Scorer
from model.towers import TwoTower
from service.batcher import Batcher

N, H = 3000, 32


def make_scorer(seed: int = 0) -> Scorer:
    torch.manual_seed(seed)
    net = TwoTower(ModelConfig(item_tower="linear", history_len=8), H, 0).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    text = torch.randn(N, H)
    return Scorer(net, text, [f"i{j}" for j in range(N)], ids=torch.randn(N, net.cfg.dim) * 0.1)


def same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    assert torch.allclose(torch.tensor([s for _, s in got]), torch.tensor([s for _, s in want]),
                          rtol=1e-5, atol=1e-6)


class Slow:
    """A Scorer whose scans take a while, so that concurrent requests queue behind one."""

    def __init__(self, scorer: Scorer, pause: float = 0.05) -> None:
        self.scorer, self.pause, self.calls = scorer, pause, []

    def rank_batch(self, histories, k, exclude):  # noqa: ANN001, ANN201
        self.calls.append(len(histories))
        time.sleep(self.pause)
        return self.scorer.rank_batch(histories, k, exclude)


def test_concurrent_requests_are_batched_and_each_gets_its_own_ranking() -> None:
    scorer = make_scorer()
    slow = Slow(scorer)
    batcher = Batcher()
    gen = torch.Generator().manual_seed(1)
    reqs = [([f"i{j}" for j in torch.randint(N, (6,), generator=gen).tolist()], 5 + r % 10)
            for r in range(48)]

    async def main() -> list:
        return await asyncio.gather(*(batcher.rank(slow, h, k, set(h)) for h, k in reqs))  # type: ignore[arg-type]

    got = asyncio.run(main())
    assert sum(slow.calls) == 48 and len(slow.calls) < 48 and max(slow.calls) > 1
    for (hist, k), g in zip(reqs, got, strict=True):
        want = scorer.rank_batch([hist], k, [set(hist)])[0]
        assert len(g) == k and not set(hist) & {i for i, _ in g}
        same(g, want)


def test_a_lone_request_is_scored_alone_at_once() -> None:
    scorer = make_scorer()
    batcher = Batcher()
    hist = ["i1", "i2", "i3"]
    got = asyncio.run(batcher.rank(scorer, hist, 10, set()))
    assert got == scorer.rank_batch([hist], 10, [set()])[0]
    assert batcher.batches == 1 and batcher.requests == 1


def test_the_event_loop_goes_on_while_a_scan_runs() -> None:
    """A scan runs on the ranker thread: the loop keeps running other coroutines meanwhile
    (on the loop itself, a 0.3 s scan would hold every other request for 0.3 s)."""
    scorer = make_scorer()
    slow = Slow(scorer, pause=0.3)
    batcher = Batcher()
    ticks: list[float] = []

    async def ticker() -> None:
        for _ in range(20):
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    async def main() -> None:
        await asyncio.gather(batcher.rank(slow, ["i1"], 10, set()), ticker())  # type: ignore[arg-type]

    asyncio.run(main())
    assert len(ticks) == 20 and max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) < 0.2


def test_requests_read_before_and_after_a_swap_are_served_by_their_own_scorer() -> None:
    a, b = make_scorer(0), make_scorer(1)
    slow_a, slow_b = Slow(a), Slow(b)
    batcher = Batcher()
    hist = ["i5", "i6"]

    async def main() -> list:
        return await asyncio.gather(*(batcher.rank(slow_a if r % 2 else slow_b, hist, 10, set())  # type: ignore[arg-type]
                                      for r in range(16)))

    got = asyncio.run(main())
    assert len(slow_a.calls) + len(slow_b.calls) < 16  # batched, and never mixed
    for r, g in enumerate(got):
        same(g, (a if r % 2 else b).rank_batch([hist], 10, [set()])[0])


def test_an_error_in_a_batch_reaches_each_of_its_requests_and_the_batcher_recovers() -> None:
    scorer = make_scorer()

    class Broken(Slow):
        def rank_batch(self, histories, k, exclude):  # noqa: ANN001, ANN201
            time.sleep(self.pause)
            raise RuntimeError("boom")

    batcher = Batcher()

    async def main() -> list:
        return await asyncio.gather(*(batcher.rank(Broken(scorer), ["i1"], 10, set())  # type: ignore[arg-type]
                                      for _ in range(6)), return_exceptions=True)

    errors = asyncio.run(main())
    assert len(errors) == 6 and all(isinstance(e, RuntimeError) for e in errors)
    got = asyncio.run(batcher.rank(scorer, ["i1"], 10, set()))
    assert got == scorer.rank_batch([["i1"]], 10, [set()])[0]


def test_a_cancelled_request_leaves_the_others_served() -> None:
    """A client that goes away cancels its request; the batch it was in is still answered."""
    scorer = make_scorer()
    slow = Slow(scorer, pause=0.1)
    batcher = Batcher()

    async def main() -> list:
        tasks = [asyncio.ensure_future(batcher.rank(slow, [f"i{r}"], 5, set()))  # type: ignore[arg-type]
                 for r in range(8)]
        await asyncio.sleep(0.02)
        tasks[0].cancel()
        tasks[5].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    got = asyncio.run(main())
    assert isinstance(got[0], asyncio.CancelledError) and isinstance(got[5], asyncio.CancelledError)
    assert all(len(g) == 5 for r, g in enumerate(got) if r not in (0, 5))
    assert batcher.requests == 8


@pytest.mark.parametrize("max_batch", [1, 3])
def test_no_request_is_left_waiting(max_batch: int) -> None:
    scorer = make_scorer()
    batcher = Batcher(max_batch=max_batch)

    async def main() -> list:
        return await asyncio.gather(*(batcher.rank(scorer, [f"i{r}"], 3, set()) for r in range(200)))

    got = asyncio.run(main())
    assert all(len(g) == 3 for g in got) and batcher.requests == 200
    assert batcher.batches >= 200 // max_batch


def test_a_batch_that_ends_without_a_ranking_fails_its_requests_instead_of_answering_empty() -> None:
    """An exception that escapes the ranker's own handling (here a BaseException, which
    `_score` does not catch) must reach each request of the batch, not leave it an empty list
    that the route would serve as a valid, empty recommendation."""
    scorer = make_scorer()

    class Abort(BaseException):
        pass

    class Aborting(Slow):
        def rank_batch(self, histories, k, exclude):  # noqa: ANN001, ANN201
            raise Abort("the scan was torn down")

    batcher = Batcher()
    aborting = Aborting(scorer)

    async def main() -> list:
        return await asyncio.gather(*(batcher.rank(aborting, ["i1"], 10, set())  # type: ignore[arg-type]
                                      for _ in range(3)), return_exceptions=True)

    got = asyncio.run(main())
    assert all(isinstance(g, Abort) for g in got), got
    assert asyncio.run(batcher.rank(scorer, ["i1"], 10, set())) == scorer.rank_batch([["i1"]], 10, [set()])[0]
