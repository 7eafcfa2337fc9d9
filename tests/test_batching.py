"""The micro-batch rule shared by the live trainer and the benchmark's simulated clock."""

from __future__ import annotations

import pytest

from model.batching import BatchPolicy, MicroBatcher, arrival_batches, arrival_polls, publish_due


def test_batch_closes_by_size_or_by_time_whichever_first() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(BatchPolicy(max_events=3, window_s=0.5))
    assert not batcher.due(0.0), "nothing to learn"
    batcher.add([1], now=10.0)
    assert not batcher.due(10.4)
    assert batcher.due(10.5), "the first event has waited a whole window"
    batcher.add([2, 3], now=10.2)
    assert batcher.take() == [1, 2, 3] and not batcher.due(11.0)
    batcher.add([4, 5, 6], now=12.0)
    assert batcher.due(12.0), "full"
    batcher.take()
    batcher.add([], now=13.0)
    batcher.add([7], now=14.0)
    assert batcher.opened == 14.0, "the window starts at the first event, not at an empty poll"


def test_a_large_poll_fills_a_batch_and_opens_the_next() -> None:
    """No micro-batch holds more than max_events, however large the poll (the trainer once
    learned 30 + 40 events in one step with max_events=64)."""
    batcher: MicroBatcher[int] = MicroBatcher(BatchPolicy(max_events=4, window_s=0.5))
    batcher.add([1, 2], now=0.0)
    batcher.add([3, 4, 5, 6, 7, 8, 9], now=0.1)
    assert batcher.due(0.1) and batcher.take() == [1, 2, 3, 4]
    assert batcher.due(0.1) and batcher.take() == [5, 6, 7, 8]
    assert not batcher.due(0.1) and batcher.waiting() == [9] and batcher.opened == 0.1


def test_records_that_arrive_after_the_window_start_the_next_batch() -> None:
    """The open micro-batch closed when its window ran out; later records are not in it."""
    batcher: MicroBatcher[int] = MicroBatcher(BatchPolicy(max_events=4, window_s=0.5))
    batcher.add([1], now=0.0)
    batcher.add([2, 3], now=0.7)
    assert batcher.take() == [1]
    assert not batcher.due(0.7) and batcher.waiting() == [2, 3]


@pytest.mark.parametrize(("rate", "sizes"), [
    (1000.0, [4, 4, 2]),  # fast: full batches
    (20.0, [3, 3, 3, 1]),  # 0.15 s windows at 20/s: events at 0, .05, .10 | .15, .20, .25 | ...
    (2.0, [1] * 10),  # slower than one event per window
])
def test_arrival_batches_follow_the_rate(rate: float, sizes: list[int]) -> None:
    batches = list(arrival_batches(list(range(10)), rate, BatchPolicy(4, 0.15)))
    assert [len(b) for b in batches] == sizes
    assert [x for b in batches for x in b] == list(range(10)), "order kept, nothing lost"


def test_arrival_polls_are_the_trainers_polls_one_record_each() -> None:
    """What the benchmark replays at a rate: a poll per arrival with the batches it closed, and
    a last poll the moment the open batch's window runs out (after the last arrival)."""
    polls = list(arrival_polls(list(range(5)), 10.0, BatchPolicy(2, 0.15)))
    assert polls[:5] == [(0.0, []), (0.1, [[0, 1]]), (0.2, []), (0.3, [[2, 3]]), (0.4, [])]
    last, batches = polls[5]
    assert batches == [[4]] and 0.55 <= last < 0.55 + 1e-9


def test_publish_due_after_the_interval() -> None:
    assert not publish_due(1.2, 1.0, 250)
    assert publish_due(1.25, 1.0, 250) and publish_due(5.0, 1.0, 0)


def test_a_trainer_behind_the_stream_publishes_less_often_up_to_four_intervals() -> None:
    """Caught up (behind < 4 intervals) the interval holds; behind by L seconds it stretches to
    L / 4, and never past 4 intervals (1 s at the default 250 ms)."""
    assert publish_due(1.25, 1.0, 250, behind_s=0.9)
    assert not publish_due(1.4, 1.0, 250, behind_s=2.0) and publish_due(1.5, 1.0, 250, behind_s=2.0)
    assert not publish_due(1.99, 1.0, 250, behind_s=60.0) and publish_due(2.0, 1.0, 250, behind_s=60.0)
    assert publish_due(1.0, 1.0, 0, behind_s=60.0)  # "publish after every poll" stays that


def test_policy_errors_are_sentences() -> None:
    with pytest.raises(ValueError, match="max_events"):
        BatchPolicy(max_events=0)
    with pytest.raises(ValueError, match="rate must be positive"):
        list(arrival_batches([1], 0.0, BatchPolicy()))
