"""Bootstrap confidence intervals shared by the benchmarks (quality, live).

Every interval is a 95% percentile bootstrap over scored events. With several seeds (several
independent runs of the same protocol), each draw resamples every seed's events on its own and
averages the seed means, so an interval covers the event sampling of every run; the spread
between seeds is reported next to it. Paired statistics (a gain of A over B, a drop from before
to after) resample the *same* event indices for both sides, which is what makes them paired.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DRAWS", "mean_ci", "paired_ratio_ci", "relative_drop_ci"]

DRAWS = 2000  # bootstrap draws: the 2.5% / 97.5% quantiles move by < 0.1 point between seeds


def _as_runs(values: Sequence[float] | Sequence[Sequence[float]]) -> list[np.ndarray]:
    """One array per run: a flat sequence is one run."""
    if len(values) and np.ndim(values[0]) == 0:
        return [np.asarray(values, dtype=float)]
    return [np.asarray(v, dtype=float) for v in values]  # type: ignore[arg-type]


def _draw_means(runs: Sequence[np.ndarray], idx: Sequence[np.ndarray]) -> np.ndarray:
    """(draws,) mean over runs of each run's resampled mean."""
    return np.mean([run[i].mean(axis=1) for run, i in zip(runs, idx, strict=True)], axis=0)


def _indices(runs: Sequence[np.ndarray], draws: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, len(run), size=(draws, len(run))) for run in runs]


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return [float(lo), float(hi)]


def mean_ci(values: Sequence[float] | Sequence[Sequence[float]], draws: int = DRAWS,
            seed: int = 0) -> tuple[float, list[float]] | tuple[None, None]:
    """(mean, [lo, hi]): the mean over runs of each run's mean, and its 95% bootstrap interval.

    `values` is one run's per-event values or a list of runs (one per seed). None, None when
    any run is empty.
    """
    runs = _as_runs(values)
    if not runs or any(len(r) == 0 for r in runs):
        return None, None
    point = float(np.mean([r.mean() for r in runs]))
    return point, _interval(_draw_means(runs, _indices(runs, draws, seed)))


def _paired(a: Sequence[float] | Sequence[Sequence[float]],
            b: Sequence[float] | Sequence[Sequence[float]],
            draws: int, seed: int) -> tuple[float, float, np.ndarray, np.ndarray] | None:
    runs_a, runs_b = _as_runs(a), _as_runs(b)
    if len(runs_a) != len(runs_b) or any(
        len(x) != len(y) for x, y in zip(runs_a, runs_b, strict=True)
    ):
        raise ValueError("paired samples need the same runs with the same number of events")
    if not runs_a or any(len(r) == 0 for r in runs_a):
        return None
    idx = _indices(runs_a, draws, seed)
    point_a = float(np.mean([r.mean() for r in runs_a]))
    point_b = float(np.mean([r.mean() for r in runs_b]))
    return point_a, point_b, _draw_means(runs_a, idx), _draw_means(runs_b, idx)


def paired_ratio_ci(a: Sequence[float] | Sequence[Sequence[float]],
                    b: Sequence[float] | Sequence[Sequence[float]],
                    draws: int = DRAWS, seed: int = 0) -> dict[str, object]:
    """Relative gain of A over B, ``mean(a) / mean(b) - 1``, with a paired 95% interval.

    `a[i]` and `b[i]` must score the same event (per run). ``{"rel_gain": x, "ci": [lo, hi]}``;
    both None when B's mean is 0 or there is nothing to compare.
    """
    res = _paired(a, b, draws, seed)
    if res is None or res[1] == 0:
        return {"rel_gain": None, "ci": None}
    point_a, point_b, da, db = res
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = np.where(db > 0, da / db - 1.0, 0.0)
    return {"rel_gain": point_a / point_b - 1.0, "ci": _interval(gains)}


def relative_drop_ci(before: Sequence[float] | Sequence[Sequence[float]],
                     after: Sequence[float] | Sequence[Sequence[float]],
                     draws: int = DRAWS, seed: int = 0) -> dict[str, object]:
    """Forgetting: ``(mean(before) - mean(after)) / mean(before)`` with a paired 95% interval.

    Positive when `after` lost what `before` knew; ``{"relative_drop": x, "ci": [lo, hi]}``.
    """
    gain = paired_ratio_ci(after, before, draws, seed)
    if gain["rel_gain"] is None:
        return {"relative_drop": None, "ci": None}
    lo, hi = gain["ci"]  # type: ignore[misc]
    return {"relative_drop": -gain["rel_gain"], "ci": [-hi, -lo]}  # type: ignore[operator]
