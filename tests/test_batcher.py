"""Batched ranking (service/batcher.py): requests that queue while a scan runs are scored in
one batch, each gets what a request of its own gets (same items, scores within float rounding),
a swap between arrivals never mixes Scorers, and an error reaches every request of its batch."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: batcher.rank(slow, r[0], r[1], set(r[0])),  # type: ignore[arg-type]
                            reqs))
    assert sum(slow.calls) == 48 and len(slow.calls) < 48 and max(slow.calls) > 1
    for (hist, k), g in zip(reqs, got, strict=True):
        want = scorer.rank_batch([hist], k, [set(hist)])[0]
        assert len(g) == k and not set(hist) & {i for i, _ in g}
        same(g, want)


def test_a_lone_request_is_scored_alone_at_once() -> None:
    scorer = make_scorer()
    batcher = Batcher()
    hist = ["i1", "i2", "i3"]
    assert batcher.rank(scorer, hist, 10, set()) == scorer.rank_batch([hist], 10, [set()])[0]
    assert batcher.batches == 1 and batcher.requests == 1


def test_requests_read_before_and_after_a_swap_are_served_by_their_own_scorer() -> None:
    a, b = make_scorer(0), make_scorer(1)
    slow_a, slow_b = Slow(a), Slow(b)
    batcher = Batcher()
    hist = ["i5", "i6"]
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(batcher.rank, slow_a if r % 2 else slow_b, hist, 10, set())  # type: ignore[arg-type]
                for r in range(16)]
        got = [f.result() for f in futs]
    for r, g in enumerate(got):
        same(g, (a if r % 2 else b).rank_batch([hist], 10, [set()])[0])


def test_an_error_in_a_batch_reaches_each_of_its_requests_and_the_batcher_recovers() -> None:
    scorer = make_scorer()

    class Broken(Slow):
        def rank_batch(self, histories, k, exclude):  # noqa: ANN001, ANN201
            time.sleep(self.pause)
            raise RuntimeError("boom")

    batcher = Batcher()
    errors = []
    barrier = threading.Barrier(6)

    def one() -> None:
        barrier.wait()
        try:
            batcher.rank(Broken(scorer), ["i1"], 10, set())  # type: ignore[arg-type]
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(errors) == 6
    assert batcher.rank(scorer, ["i1"], 10, set()) == scorer.rank_batch([["i1"]], 10, [set()])[0]


@pytest.mark.parametrize("threads", [2, 16])
def test_no_request_is_left_waiting(threads: int) -> None:
    scorer = make_scorer()
    batcher = Batcher(max_batch=3)
    with ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(lambda r: batcher.rank(scorer, [f"i{r}"], 3, set()), range(200)))
    assert all(len(g) == 3 for g in got) and batcher.requests == 200
