"""Tests of the bootstrap intervals (bench/stats.py) shared by the quality and live benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from bench.stats import mean_ci, paired_ratio_ci, relative_drop_ci


def test_mean_ci_of_a_constant_is_the_constant() -> None:
    assert mean_ci([0.5] * 20) == (0.5, [0.5, 0.5])
    assert mean_ci([]) == (None, None)


def test_mean_ci_matches_the_normal_interval_of_hits() -> None:
    rng = np.random.default_rng(1)
    hits = (rng.random(4000) < 0.2).astype(float).tolist()
    mean, (lo, hi) = mean_ci(hits)
    se = (mean * (1 - mean) / len(hits)) ** 0.5
    assert lo < mean < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_mean_ci_over_seeds_averages_the_runs() -> None:
    mean, (lo, hi) = mean_ci([[1.0] * 10, [0.0] * 30])
    assert mean == 0.5 and lo == hi == 0.5  # each run constant: only the seeds' mean is left
    one_run, _ = mean_ci([[1.0, 0.0, 0.0, 0.0]])
    assert one_run == 0.25


def test_paired_gain_is_tighter_than_the_unpaired_spread() -> None:
    rng = np.random.default_rng(2)
    base = (rng.random(5000) < 0.2).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:100]] = 1.0  # 100 more hits on the same events
    out = paired_ratio_ci(better.tolist(), base.tolist())
    assert out["rel_gain"] == pytest.approx(better.mean() / base.mean() - 1)
    lo, hi = out["ci"]
    assert 0 < lo < out["rel_gain"] < hi  # paired: the gain is clear though HRs' CIs overlap
    same = paired_ratio_ci(base.tolist(), base.tolist())
    assert same == {"rel_gain": 0.0, "ci": [0.0, 0.0]}
    assert paired_ratio_ci([1.0], [0.0]) == {"rel_gain": None, "ci": None}
    with pytest.raises(ValueError):
        paired_ratio_ci([1.0, 0.0], [1.0])


def test_relative_drop_is_the_negated_gain() -> None:
    before = [1.0] * 50 + [0.0] * 50
    after = [1.0] * 25 + [0.0] * 75
    out = relative_drop_ci(before, after)
    assert out["relative_drop"] == pytest.approx(0.5)
    lo, hi = out["ci"]
    assert 0 < lo < 0.5 < hi <= 1.0
    assert relative_drop_ci([0.0, 0.0], [1.0, 0.0]) == {"relative_drop": None, "ci": None}
