"""Prequential quality benchmark: predict each event before learning it, over a timed stream.

Protocol (the defaults; see `QualityConfig`):

1. Events in time order, each user's same-second events ordered by a hash seeded with `seed`
   (`freshrec.data.hash_ties`; `ties="id"` keeps the leaky item-id order); optionally only the
   first N. With `rate`, stream micro-batches close as the live trainer's do at that rate.
2. Warm-up: the first 50%. Each warm-up user's last warm-up event (users with at least two
   warm-up events) is held out and never trained on. Every method learns the rest of the
   warm-up, in micro-batches, `warmup_passes` times.
3. A copy of the model taken now is the *static twin*.
4. Stream: the other 50% in micro-batches of 256. For each batch, first rank top-10 for every
   event of the batch with the state from before the batch (the history of an event includes
   the earlier events of its user in the same batch; items the user interacted with before,
   warm-up included, are excluded), score the event's item, then `learn(batch)`.
5. HR@10 / NDCG@10 overall, per window of 5,000 stream events and for the slices `new_users`
   (user first seen after warm-up), `cold_items` (item first seen after warm-up) and `rest`
   (neither); an event can be in both of the first two. Throughput counts `learn()` time only.
6. Forgetting: HR@10 on the held-out warm-up events, static twin vs the model after the stream.
7. Leave-one-out, on a fresh model: each user's last item is the test, the second-last the
   validation; train on the rest in time order; rank the full catalog without the user's other
   items.

Methods come from `METHODS` (name -> factory(catalog, config)); `register` adds more, and
`frozen_after_warmup(factory)` makes the `static` variant of any method.
``python -m bench.quality --out DIR`` writes DIR/quality.json and DIR/quality.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.baselines import ImplicitALS, ItemKNN, Popularity, RiverMF, StreamingRecommender
from bench.stats import mean_ci, paired_ratio_ci, relative_drop_ci
from freshrec.data import (
    Dataset,
    Interaction,
    Item,
    hash_ties,
    load_movielens,
    ml100k_dir,
    synthetic_stream,
)
from model.batching import BatchPolicy, arrival_polls
from model.config import ModelConfig

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "Case",
    "FrozenAfterWarmup",
    "MethodFactory",
    "QualityConfig",
    "Scores",
    "forgetting",
    "frozen_after_warmup",
    "leave_one_out",
    "collect",
    "main",
    "merge_raw",
    "ndcg_at",
    "prequential",
    "rank_cases",
    "register",
    "run_method",
    "run_quality",
    "split_warmup",
    "summarize",
    "write_outputs",
]


@dataclass
class QualityConfig:
    """Knobs of the protocol; the defaults are the published protocol."""

    events: int | None = None  # use only the first N events (None: all)
    warmup_frac: float = 0.5  # share of the events used for warm-up
    batch_size: int = 256  # micro-batch size, warm-up and stream alike
    warmup_passes: int = 1  # passes over the warm-up events
    loo_passes: int = 1  # passes over the leave-one-out training events
    k: int = 10  # cut-off of HR@k and NDCG@k
    window: int = 5000  # stream events per reported window
    history_len: int = 50  # most recent items handed to rank_batch per user
    eval_batch: int = 512  # users per rank_batch call outside the stream
    seed: int = 0  # passed on to methods that sample
    loo: bool = True  # run the leave-one-out protocol too
    # Stream events arriving evenly at this rate (events/s): micro-batches then close as the
    # live trainer closes them (`model.batching`: batch_size events or batch_window_s after the
    # first), and the neural methods publish at most every publish_interval_s of that clock.
    # None: fixed micro-batches of batch_size, a publish every 4 of them.
    rate: float | None = None
    # Same-second events of a user: "hash" orders them by a hash seeded with `seed`; "id" keeps
    # the dataset's (ts, user, item id) order, which leaks the next item (the id grows)
    ties: str = "hash"
    warmup_events: int | None = None  # exactly this many warm-up events (overrides warmup_frac)
    # Held-out warm-up events that measure forgetting, never trained on. "disjoint": the last
    # `holdout_frac` (at least one) of the warm-up events of each warm-up user who never returns
    # in the stream, so the stream cannot teach their answers again (backward transfer), only
    # forget them; "last": each warm-up user's last warm-up event (the old, confounded set);
    # "none": hold nothing out
    holdout: str = "disjoint"
    holdout_frac: float = 0.1
    per_event: bool = False  # keep every stream event's hit and NDCG in the result
    batch_window_s: float = BatchPolicy.window_s
    publish_interval_s: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 < self.warmup_frac < 1.0:
            raise ValueError(
                f"warmup_frac must lie strictly between 0 and 1, got {self.warmup_frac}"
            )
        for name in ("batch_size", "k", "window", "history_len", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_passes < 0 or self.loo_passes < 0:
            raise ValueError("warmup_passes and loo_passes must be >= 0")
        if self.holdout not in ("disjoint", "last", "none"):
            raise ValueError(f"holdout must be disjoint, last or none, got {self.holdout!r}")
        if not 0.0 < self.holdout_frac <= 1.0:
            raise ValueError(f"holdout_frac must lie in (0, 1], got {self.holdout_frac}")
        if self.ties not in ("hash", "id"):
            raise ValueError(f"ties must be hash or id, got {self.ties!r}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive events/s, got {self.rate}")
        if self.events is not None and self.events < 2:
            raise ValueError(f"events must be at least 2, got {self.events}")


MethodFactory = Callable[[Sequence[Item], QualityConfig], StreamingRecommender]

METHODS: dict[str, MethodFactory] = {}


def register(name: str, factory: MethodFactory) -> None:
    """Make a method available to the harness (replaces an earlier one of that name)."""
    METHODS[name] = factory


class FrozenAfterWarmup:
    """Wraps a method so that it learns during warm-up only: the `static` variant of a method.

    The harness calls ``end_warmup()`` on any method that has it once warm-up training is done
    (leave-one-out never calls it, so there the wrapped method trains on everything).
    """

    def __init__(self, inner: StreamingRecommender, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or f"{inner.name}-static"
        self.wants_user_ids = bool(getattr(inner, "wants_user_ids", False))
        self.frozen = False

    def add_items(self, items: Sequence[Item]) -> None:
        """Forwarded to the wrapped method."""
        self.inner.add_items(items)

    def learn(self, batch: Sequence[Interaction]) -> None:
        """Forwarded until `end_warmup`, ignored after."""
        if not self.frozen:
            self.inner.learn(batch)

    def end_warmup(self) -> None:
        """Stop learning."""
        self.frozen = True

    def rank_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int,
        exclude: Sequence[Collection[str]],
        **kwargs: Any,
    ) -> list[list[str]]:
        """Forwarded to the wrapped method (with ``users=`` when it wants them)."""
        return self.inner.rank_batch(histories, k, exclude, **kwargs)


def frozen_after_warmup(factory: MethodFactory) -> MethodFactory:
    """The `static` twin of a method factory: same model, no learning after warm-up."""
    return lambda catalog, cfg: FrozenAfterWarmup(factory(catalog, cfg))


def _end_warmup(model: StreamingRecommender) -> None:
    hook = getattr(model, "end_warmup", None)
    if callable(hook):
        hook()


# The model's logQ half-life, read from the dataclass default so torch is not imported here
register("popularity", lambda catalog, cfg: Popularity(halflife=ModelConfig.logq_halflife))
register("popularity-alltime", lambda catalog, cfg: Popularity())
register("itemknn", lambda catalog, cfg: ItemKNN())
register("als", lambda catalog, cfg: ImplicitALS(seed=cfg.seed))
# Not in the default table: under-trained online MF (LOO HR@10 like popularity's); `als` is the
# matrix-factorisation peer now (bench/RESULTS.md, "Honest quality")
register("river_mf", lambda catalog, cfg: RiverMF(seed=cfg.seed))

NEURAL_METHODS = (
    "incremental",
    "incremental-no-replay",
    "incremental-no-anchor",  # the ema anchor off (on by default)
    "incremental-anchor",  # the L2-SP anchor to the last publish instead of the ema one
    "incremental-adaptive-lr",  # the adaptive lr on (off by default)
    "incremental-id-only",
    "incremental-mlp",  # the mlp item tower (the default before the linear one)
    "retrain",
)


def _neural(name: str) -> MethodFactory:
    """A factory from bench/neural.py, imported on first use (it pulls in torch)."""

    def factory(catalog: Sequence[Item], cfg: QualityConfig) -> StreamingRecommender:
        from bench.neural import neural_factories

        return neural_factories()[name](catalog, cfg)  # type: ignore[no-any-return]

    return factory


register("static", frozen_after_warmup(_neural("incremental")))
for _name in NEURAL_METHODS:
    register(_name, _neural(_name))

# What `--methods` runs when not given (river_mf is registered but not run; see above)
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("river_mf", "popularity-alltime"))


# ---------------------------------------------------------------------------------------------
# Metrics


@dataclass(frozen=True)
class Case:
    """One prediction to score: what the method is given, and the item it should find."""

    user_id: str
    item_id: str  # the target
    history: tuple[str, ...]  # the user's recent items before the target, oldest first
    exclude: frozenset[str]  # items the user interacted with before


def ndcg_at(ranked: Sequence[str], target: str, k: int) -> tuple[float, float]:
    """(hit, NDCG) of `target` in the first `k` of `ranked`: 1/log2(rank + 1) at 1-based rank."""
    for rank, item_id in enumerate(ranked[:k], start=1):
        if item_id == target:
            return 1.0, 1.0 / math.log2(rank + 1)
    return 0.0, 0.0


@dataclass
class Scores:
    """Running sums of hits and NDCG."""

    hits: float = 0.0
    ndcg: float = 0.0
    n: int = 0

    def add(self, hit: float, gain: float) -> None:
        """Count one scored case."""
        self.hits += hit
        self.ndcg += gain
        self.n += 1

    def as_dict(self, k: int) -> dict[str, float | int]:
        """``{"hr@k", "ndcg@k", "n"}``; zeros when nothing was scored."""
        n = max(self.n, 1)
        return {f"hr@{k}": self.hits / n, f"ndcg@{k}": self.ndcg / n, "n": self.n}


def rank_cases(model: StreamingRecommender, cases: Sequence[Case], k: int) -> list[list[str]]:
    """One `rank_batch` call for `cases`; passes ``users=`` to methods that want user ids."""
    histories = [c.history for c in cases]
    exclude: list[Collection[str]] = [c.exclude for c in cases]
    if getattr(model, "wants_user_ids", False):
        return model.rank_batch(histories, k, exclude, users=[c.user_id for c in cases])  # type: ignore[call-arg]
    return model.rank_batch(histories, k, exclude)


def score_cases(
    model: StreamingRecommender, cases: Sequence[Case], k: int, batch: int = 512
) -> list[tuple[float, float]]:
    """(hit, NDCG) of `model` on each of `cases`, ranked `batch` at a time, without learning."""
    out: list[tuple[float, float]] = []
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        for case, ranked in zip(chunk, rank_cases(model, chunk, k), strict=True):
            out.append(ndcg_at(ranked, case.item_id, k))
    return out


def _totals(values: Sequence[tuple[float, float]]) -> Scores:
    scores = Scores()
    for hit, gain in values:
        scores.add(hit, gain)
    return scores


def evaluate(
    model: StreamingRecommender, cases: Sequence[Case], k: int, batch: int = 512
) -> Scores:
    """HR/NDCG of `model` on `cases`, ranked `batch` at a time, without learning."""
    return _totals(score_cases(model, cases, k, batch))


# ---------------------------------------------------------------------------------------------
# Protocol pieces


def _batches(events: Sequence[Interaction], size: int) -> Iterator[Sequence[Interaction]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


def _stream_polls(events: Sequence[Interaction], cfg: QualityConfig
                  ) -> Iterator[tuple[float | None, Sequence[Sequence[Interaction]]]]:
    """(clock time, the micro-batches learned then): fixed-size batches one at a time on no
    clock, or the live trainer's polls with the batches they close at `cfg.rate`."""
    if cfg.rate is None:
        return ((None, [batch]) for batch in _batches(events, cfg.batch_size))
    return arrival_polls(events, cfg.rate, BatchPolicy(cfg.batch_size, cfg.batch_window_s))


class _Histories:
    """Every user's items so far, in event order."""

    def __init__(self, history_len: int) -> None:
        self.history_len = history_len
        self.items: dict[str, list[str]] = defaultdict(list)
        self.seen: dict[str, set[str]] = defaultdict(set)

    def case(self, event: Interaction) -> Case:
        items = self.items.get(event.user_id, [])
        return Case(
            event.user_id,
            event.item_id,
            tuple(items[-self.history_len :]),
            frozenset(self.seen.get(event.user_id, ())),
        )

    def add(self, event: Interaction) -> None:
        self.items[event.user_id].append(event.item_id)
        self.seen[event.user_id].add(event.item_id)


@dataclass
class WarmupSplit:
    """The warm-up events, split into what is trained on and what is held out."""

    train: list[Interaction]
    heldout: list[Case]  # each warm-up user's last warm-up event, with the history before it
    stream: list[Interaction]
    all_warmup: list[Interaction]


def _heldout_positions(warm: Sequence[Interaction], stream: Sequence[Interaction],
                       cfg: QualityConfig) -> set[int]:
    """Positions in `warm` held out for the forgetting measure (see `QualityConfig.holdout`).

    Only users with at least two warm-up events lose any: one is always trained on.
    """
    if cfg.holdout == "none":
        return set()
    positions: dict[str, list[int]] = defaultdict(list)
    for pos, event in enumerate(warm):
        positions[event.user_id].append(pos)
    if cfg.holdout == "last":
        return {pos[-1] for pos in positions.values() if len(pos) >= 2}
    returning = {e.user_id for e in stream}
    held: set[int] = set()
    for user, pos in positions.items():
        if user in returning or len(pos) < 2:
            continue
        n = min(len(pos) - 1, max(1, round(cfg.holdout_frac * len(pos))))
        held.update(pos[-n:])
    return held


def split_warmup(events: Sequence[Interaction], cfg: QualityConfig) -> WarmupSplit:
    """Split time-ordered `events` into warm-up (train + held-out) and stream."""
    n_warm = cfg.warmup_events or int(len(events) * cfg.warmup_frac)
    n_warm = max(1, min(len(events) - 1, n_warm))
    warm, stream = list(events[:n_warm]), list(events[n_warm:])
    held_pos = _heldout_positions(warm, stream, cfg)
    hist = _Histories(cfg.history_len)
    train, heldout = [], []
    for pos, event in enumerate(warm):
        if pos in held_pos:
            heldout.append(hist.case(event))
        else:
            train.append(event)
        hist.add(event)
    return WarmupSplit(train=train, heldout=heldout, stream=stream, all_warmup=warm)


def _learn_passes(
    model: StreamingRecommender, events: Sequence[Interaction], cfg: QualityConfig, passes: int
) -> float:
    """Feed `events` `passes` times in micro-batches; returns the seconds spent in learn()."""
    spent = 0.0
    for _ in range(passes):
        for batch in _batches(events, cfg.batch_size):
            t0 = time.perf_counter()
            model.learn(batch)
            spent += time.perf_counter() - t0
    return spent


@dataclass
class StreamResult:
    """What the prequential pass over the stream measured."""

    overall: Scores = field(default_factory=Scores)
    slices: dict[str, Scores] = field(
        default_factory=lambda: {"new_users": Scores(), "cold_items": Scores(), "rest": Scores()}
    )
    windows: list[dict[str, Any]] = field(default_factory=list)
    learn_s: float = 0.0
    rank_s: float = 0.0
    events: int = 0
    per_event: list[tuple[float, float]] = field(default_factory=list)  # (hit, ndcg) in order


def prequential(
    model: StreamingRecommender,
    split: WarmupSplit,
    cfg: QualityConfig,
) -> StreamResult:
    """Rank then learn each stream micro-batch; `model` must already be warmed up.

    Histories and exclusions start from every warm-up event (held-out ones included: they
    happened, they were just not trained on).
    """
    hist = _Histories(cfg.history_len)
    warm_users, warm_items = set(), set()
    for event in split.all_warmup:
        hist.add(event)
        warm_users.add(event.user_id)
        warm_items.add(event.item_id)

    result = StreamResult()
    window = Scores()
    window_start = 0
    k = cfg.k
    for now, batches in _stream_polls(split.stream, cfg):
        for batch in batches:
            cases = []
            for event in batch:
                cases.append(hist.case(event))
                hist.add(event)
            t0 = time.perf_counter()
            ranked = rank_cases(model, cases, k)
            result.rank_s += time.perf_counter() - t0
            for case, top in zip(cases, ranked, strict=True):
                hit, gain = ndcg_at(top, case.item_id, k)
                result.overall.add(hit, gain)
                result.per_event.append((hit, gain))
                window.add(hit, gain)
                new_user = case.user_id not in warm_users
                cold_item = case.item_id not in warm_items
                if new_user:
                    result.slices["new_users"].add(hit, gain)
                if cold_item:
                    result.slices["cold_items"].add(hit, gain)
                if not (new_user or cold_item):
                    result.slices["rest"].add(hit, gain)
                if window.n == cfg.window:
                    result.windows.append(
                        {"start": window_start, "end": window_start + window.n, **window.as_dict(k)}
                    )
                    window_start += window.n
                    window = Scores()
            t0 = time.perf_counter()
            model.learn(batch)
            result.learn_s += time.perf_counter() - t0
            result.events += len(batch)
        tick = getattr(model, "tick", None)
        if now is not None and tick is not None:
            tick(now)  # a model that publishes on the trainer's clock
    if window.n:
        result.windows.append(
            {"start": window_start, "end": window_start + window.n, **window.as_dict(k)}
        )
    return result


def forgetting(
    static_model: StreamingRecommender,
    incremental_model: StreamingRecommender,
    heldout: Sequence[Case],
    k: int = 10,
) -> dict[str, Any]:
    """Relative drop of HR@k on `heldout` from `static_model` to `incremental_model`.

    ``relative_drop = (hr_static - hr_incremental) / hr_static``: positive when the model that
    kept learning lost old knowledge, negative when it gained; None when the static HR is 0.
    ``ci``: its paired 95% bootstrap interval over the held-out events.
    """
    before = score_cases(static_model, heldout, k)
    after = score_cases(incremental_model, heldout, k)
    static, incremental = _totals(before).as_dict(k), _totals(after).as_dict(k)
    hr_s, hr_i = static[f"hr@{k}"], incremental[f"hr@{k}"]
    drop = (hr_s - hr_i) / hr_s if hr_s > 0 else None
    return {
        "relative_drop": drop,
        "ci": relative_drop_ci([h for h, _ in before], [h for h, _ in after])["ci"],
        "_before": [h for h, _ in before],  # per-event hits, pooled over seeds then dropped
        "_after": [h for h, _ in after],
        f"static_hr@{k}": hr_s,
        f"incremental_hr@{k}": hr_i,
        f"static_ndcg@{k}": static[f"ndcg@{k}"],
        f"incremental_ndcg@{k}": incremental[f"ndcg@{k}"],
        "n_heldout": len(heldout),
    }


def leave_one_out(
    factory: MethodFactory,
    catalog: Sequence[Item],
    events: Sequence[Interaction],
    cfg: QualityConfig,
) -> dict[str, Any]:
    """Leave-one-out on a fresh model: last item = test, second-last = validation.

    Users with fewer than three events only contribute training events. Training runs over the
    remaining events in time order (`loo_passes` passes). The test case's history is everything
    before it (validation included); its exclusions are the user's other items. The test cases
    are scored again without any exclusion (``seen_included``), as RecBole's full ranking does.
    """
    t_start = time.perf_counter()
    by_user: dict[str, list[int]] = defaultdict(list)
    for pos, event in enumerate(events):
        by_user[event.user_id].append(pos)
    held: set[int] = set()
    tests, vals = [], []
    for user, positions in by_user.items():
        if len(positions) < 3:
            continue
        *train_pos, val_pos, test_pos = positions
        held.update((val_pos, test_pos))
        train_items = [events[p].item_id for p in train_pos]
        val_item, test_item = events[val_pos].item_id, events[test_pos].item_id
        before_test = train_items + [val_item]
        tests.append(
            Case(user, test_item, tuple(before_test[-cfg.history_len :]), frozenset(before_test))
        )
        vals.append(
            Case(user, val_item, tuple(train_items[-cfg.history_len :]), frozenset(train_items))
        )
    train = [e for pos, e in enumerate(events) if pos not in held]

    model = factory(catalog, cfg)
    model.add_items(catalog)
    learn_s = _learn_passes(model, train, cfg, cfg.loo_passes)
    k = cfg.k
    test_values = score_cases(model, tests, k, cfg.eval_batch)
    test = _totals(test_values).as_dict(k)
    val = evaluate(model, vals, k, cfg.eval_batch).as_dict(k)
    # RecBole's full ranking keeps the user's earlier items among the candidates
    full = [replace(c, exclude=frozenset()) for c in tests]
    full_values = score_cases(model, full, k, cfg.eval_batch)
    seen_included = _totals(full_values).as_dict(k)
    return {
        f"hr@{k}": test[f"hr@{k}"],
        f"ndcg@{k}": test[f"ndcg@{k}"],
        "seen_included": {
            f"hr@{k}": seen_included[f"hr@{k}"], f"ndcg@{k}": seen_included[f"ndcg@{k}"],
            "_per_event": full_values,
        },
        "_per_event": test_values,
        f"val_hr@{k}": val[f"hr@{k}"],
        f"val_ndcg@{k}": val[f"ndcg@{k}"],
        "n_users": test["n"],
        "train_events": len(train),
        "learn_s": learn_s,
        "wall_s": time.perf_counter() - t_start,
    }


def ordered_events(dataset: Dataset, cfg: QualityConfig) -> list[Interaction]:
    """The stream the protocol runs on: same-second ties ordered as `cfg.ties` says, then the
    first `cfg.events`."""
    events = hash_ties(dataset.interactions, cfg.seed) if cfg.ties == "hash" \
        else list(dataset.interactions)
    return events[: cfg.events] if cfg.events else events


def run_method(
    name: str,
    factory: MethodFactory,
    dataset: Dataset,
    events: Sequence[Interaction],
    cfg: QualityConfig,
) -> dict[str, Any]:
    """Everything measured for one method: prequential, slices, windows, forgetting, LOO."""
    t_start = time.perf_counter()
    split = split_warmup(events, cfg)
    model = factory(dataset.items, cfg)
    model.add_items(dataset.items)
    warm_learn_s = _learn_passes(model, split.train, cfg, cfg.warmup_passes)
    _end_warmup(model)
    try:
        static = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a model that cannot be copied is trained twice instead
        static = factory(dataset.items, cfg)
        static.add_items(dataset.items)
        _learn_passes(static, split.train, cfg, cfg.warmup_passes)
        _end_warmup(static)
    stream = prequential(model, split, cfg)
    forgot = forgetting(static, model, split.heldout, cfg.k)
    wall_s = time.perf_counter() - t_start
    k = cfg.k
    overall = stream.overall.as_dict(k)
    out: dict[str, Any] = {
        f"hr@{k}": overall[f"hr@{k}"],
        f"ndcg@{k}": overall[f"ndcg@{k}"],
        "events_per_s": (  # a frozen model learns nothing in the stream: no throughput
            stream.events / stream.learn_s
            if stream.learn_s > 0 and not isinstance(model, FrozenAfterWarmup)
            else None
        ),
        "wall_s": wall_s,
        "warmup_events_per_s": (
            len(split.train) * cfg.warmup_passes / warm_learn_s if warm_learn_s > 0 else None
        ),
        "rank_ms_per_event": 1e3 * stream.rank_s / max(stream.events, 1),
        "slices": {name_: s.as_dict(k) for name_, s in stream.slices.items()},
        "windows": stream.windows,
        "forgetting": forgot,
    }
    out["_per_event"] = stream.per_event  # pooled over seeds for the intervals, then dropped
    if cfg.per_event:
        out["per_event"] = stream.per_event
    stats = getattr(model, "stats", None)
    if callable(stats):
        out["stats"] = stats()
    if cfg.loo:
        out["loo"] = leave_one_out(factory, dataset.items, events, cfg)
    return out


def _mean_tree(values: Sequence[Any]) -> Any:
    """The mean over seeds of results of the same shape: numbers are averaged leaf by leaf;
    anything else (strings, Nones, lists of different lengths) is taken from the first seed."""
    first = values[0]
    if all(isinstance(v, dict) for v in values) and all(v.keys() == first.keys() for v in values):
        return {key: _mean_tree([v[key] for v in values]) for key in first}
    if all(isinstance(v, list) for v in values) and all(len(v) == len(first) for v in values):
        return [_mean_tree([v[i] for v in values]) for i in range(len(first))]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values) / len(values)
    return first


def _column(runs: Sequence[Sequence[tuple[float, float]]], col: int) -> list[list[float]]:
    return [[row[col] for row in run] for run in runs]


def _with_cis(out: dict[str, Any], runs: Sequence[Sequence[tuple[float, float]]], k: int) -> None:
    """Add ``hr@k_ci`` and ``ndcg@k_ci`` (95%, bootstrap over events, pooled over seeds)."""
    for col, metric in ((0, f"hr@{k}"), (1, f"ndcg@{k}")):
        _, out[f"{metric}_ci"] = mean_ci(_column(runs, col))


def _merge_seeds(per_seed: Sequence[dict[str, Any]], seeds: Sequence[int], k: int
                 ) -> dict[str, Any]:
    """One method's result over seeds: means, per-seed headline numbers and 95% intervals."""
    stream = [r.pop("_per_event") for r in per_seed]
    before = [r["forgetting"].pop("_before") for r in per_seed]
    after = [r["forgetting"].pop("_after") for r in per_seed]
    loo = [r["loo"].pop("_per_event") for r in per_seed if "loo" in r]
    loo_full = [r["loo"]["seen_included"].pop("_per_event") for r in per_seed if "loo" in r]
    out: dict[str, Any] = _mean_tree(list(per_seed))
    _with_cis(out, stream, k)
    out["seeds"] = list(seeds)
    for metric in (f"hr@{k}", f"ndcg@{k}"):
        out[f"{metric}_seeds"] = [r[metric] for r in per_seed]
    drop = relative_drop_ci(before, after)
    out["forgetting"].update(drop)
    if loo:
        _with_cis(out["loo"], loo, k)
        _with_cis(out["loo"]["seen_included"], loo_full, k)
    out["_runs"] = stream
    return out


def run_quality(
    dataset: Dataset,
    methods: Sequence[str],
    cfg: QualityConfig,
    log: Callable[[str], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run every named method once per seed; the result is what quality.json holds.

    A seed sets both the same-second tie order and the methods' initialisation (`cfg.seed`);
    None runs `cfg.seed` alone. Each method's numbers are means over the seeds with 95%
    bootstrap intervals over the scored events (`bench.stats`); ``comparisons`` holds the
    paired relative gain of `incremental` over every other method run.
    """
    return summarize(collect(dataset, methods, cfg, log, seeds))


def collect(
    dataset: Dataset,
    methods: Sequence[str],
    cfg: QualityConfig,
    log: Callable[[str], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The raw runs behind `run_quality`: per method, one result per seed with its per-event
    hits. Raw runs of different seeds (other processes) combine with `merge_raw`."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
    seeds = list(seeds) if seeds else [cfg.seed]
    k = cfg.k
    per_method: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    protocol: dict[str, Any] = {}
    for seed in seeds:
        scfg = replace(cfg, seed=seed)
        events = ordered_events(dataset, scfg)
        split = split_warmup(events, scfg)
        if not protocol:
            protocol = {
                **asdict(cfg),
                "dataset": dataset.name,
                "n_events": len(events),
                "n_users": len({e.user_id for e in events}),
                "n_items": len(dataset.items),
                "warmup_events": len(split.all_warmup),
                "heldout_events": len(split.heldout),
                "heldout_users": len({c.user_id for c in split.heldout}),
                "stream_events": len(split.stream),
                "seeds": seeds,
                "description": (
                    "prequential: rank top-k for each stream event from the state before its "
                    "micro-batch, then learn the batch; excluded: the user's earlier items. "
                    "Each seed orders same-second ties and initialises the models; numbers are "
                    "means over seeds, intervals 95% bootstrap over events pooled over seeds"
                ),
            }
            protocol.pop("seed")
        for name in methods:
            res = run_method(name, METHODS[name], dataset, events, scfg)
            per_method[name].append(res)
            if log is not None:
                log(f"seed {seed} {name}: HR@{k} {res[f'hr@{k}']:.4f} in {res['wall_s']:.1f} s")
    return {"protocol": protocol, "runs": per_method}


def merge_raw(raws: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Raw runs of the same protocol from several processes as one raw result: other seeds,
    other methods, or both. Every method must have run with every seed."""
    protocol = dict(raws[0]["protocol"])
    table: dict[str, dict[int, Any]] = {}
    for raw in raws:
        for name, runs in raw["runs"].items():
            for seed, run in zip(raw["protocol"]["seeds"], runs, strict=True):
                table.setdefault(name, {})[seed] = run
    seeds = sorted({seed for by_seed in table.values() for seed in by_seed})
    missing = [(name, s) for name, by_seed in table.items() for s in seeds if s not in by_seed]
    if missing:
        raise ValueError(f"no run of (method, seed) {missing}: every method needs every seed")
    protocol["seeds"] = seeds
    return {"protocol": protocol,
            "runs": {name: [by_seed[s] for s in seeds] for name, by_seed in table.items()}}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """What quality.json holds, from raw runs: means over seeds, intervals, comparisons."""
    protocol, per_method = raw["protocol"], raw["runs"]
    seeds, k = protocol["seeds"], protocol["k"]
    methods = list(per_method)
    results = {name: _merge_seeds(copy.deepcopy(runs), seeds, k)
               for name, runs in per_method.items()}
    comparisons: dict[str, Any] = {}
    if "incremental" in results:
        for name, res in results.items():
            if name != "incremental":
                comparisons[f"incremental_vs_{name}"] = paired_ratio_ci(
                    _column(results["incremental"]["_runs"], 0), _column(res["_runs"], 0))
    for res in results.values():
        res.pop("_runs")
    pick = "incremental" if "incremental" in results else (methods[0] if methods else None)
    top_forgetting: dict[str, Any] = {"relative_drop": None}
    if pick is not None:
        top_forgetting = {"method": pick, **results[pick]["forgetting"]}
    return {"protocol": protocol, "methods": results, "comparisons": comparisons,
            "forgetting": {**top_forgetting, "user_disjoint": top_forgetting}}


# ---------------------------------------------------------------------------------------------
# Output


def _ci(ci: Sequence[float] | None, fmt: str = ".4f") -> str:
    return "-" if not ci else f"[{ci[0]:{fmt}},{ci[1]:{fmt}}]"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the headline numbers (means over seeds, 95% intervals)."""
    k = result["protocol"]["k"]
    head = (
        f"{'method':<28}{'HR@' + str(k):>8}{'95% CI':>17}{'NDCG@' + str(k):>9}{'new_usr':>9}"
        f"{'cold_it':>9}{'rest':>8}{'forget':>8}{'LOO HR':>8}{'LOO+seen':>9}{'ev/s':>10}"
        f"{'wall s':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, m in result["methods"].items():
        sl = m["slices"]
        drop = m["forgetting"]["relative_drop"]
        loo = m.get("loo", {}).get(f"hr@{k}")
        loo_full = m.get("loo", {}).get("seen_included", {}).get(f"hr@{k}")
        eps = m["events_per_s"]
        lines.append(
            f"{name:<28}{m[f'hr@{k}']:>8.4f}{_ci(m.get(f'hr@{k}_ci')):>17}{m[f'ndcg@{k}']:>9.4f}"
            f"{sl['new_users'][f'hr@{k}']:>9.4f}{sl['cold_items'][f'hr@{k}']:>9.4f}"
            f"{sl['rest'][f'hr@{k}']:>8.4f}{'-' if drop is None else f'{drop:+.3f}':>8}"
            f"{'-' if loo is None else f'{loo:.4f}':>8}"
            f"{'-' if loo_full is None else f'{loo_full:.4f}':>9}"
            f"{'-' if eps is None else f'{eps:,.0f}':>10}{m['wall_s']:>8.1f}"
        )
    for name, c in result.get("comparisons", {}).items():
        gain = c["rel_gain"]
        lines.append(f"{name}: {'-' if gain is None else f'{gain:+.2%}'} HR@{k}, 95% CI "
                     f"{_ci(c['ci'], '+.2%')}")
    for name, f in result.get("forgetting", {}).items():
        if isinstance(f, dict):
            drop = f.get("relative_drop")
            lines.append(f"forgetting {name} ({f.get('method')}): "
                         f"{'-' if drop is None else f'{drop:+.2%}'}, 95% CI "
                         f"{_ci(f.get('ci'), '+.2%')}")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write quality.json and quality.png (windowed HR@k, one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "quality.json", out / "quality.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    k = result["protocol"]["k"]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for name, m in result["methods"].items():
        xs = [w["end"] for w in m["windows"]]
        ax.plot(xs, [w[f"hr@{k}"] for w in m["windows"]], marker="o", markersize=3, label=name)
    ax.set_xlabel("stream position (events after warm-up)")
    ax.set_ylabel(f"HR@{k} per window of {result['protocol']['window']} events")
    ax.set_title(f"Prequential HR@{k} on {result['protocol']['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the lines
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """["lr=1e-3", "item_tower=linear"] -> {"lr": 0.001, "item_tower": "linear"}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"expected FIELD=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _configure(parser: argparse.ArgumentParser, args: argparse.Namespace
               ) -> tuple[list[str], list[str], list[int], QualityConfig]:
    """The methods (stream and drift), seeds and protocol of a parsed command line; sets up
    torch and `bench.neural.BASE_CONFIG` (``--encoder``, ``--set`` ...) when any method run,
    on the stream or on the recurring-drift stream, is neural."""
    methods = (
        [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
        else list(DEFAULT_METHODS)
    )
    drift_methods = [] if args.no_drift or args.merge else (
        [m.strip() for m in args.drift_methods.split(",") if m.strip()]
        if args.drift_methods else [m for m in methods if m != "static"]
    )
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    unknown = [m for m in methods + drift_methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {', '.join(sorted(METHODS))}")
    try:
        cfg = QualityConfig(
            events=args.events, batch_size=args.batch_size, warmup_passes=args.warmup_passes,
            window=args.window, seed=args.seed, loo=not args.no_loo, rate=args.rate,
            ties=args.ties,
            batch_window_s=args.batch_window_ms / 1000,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    if any(m in NEURAL_METHODS or m == "static" for m in methods + drift_methods):
        import torch

        torch.set_num_threads(max(1, args.torch_threads))
        from bench import neural

        neural.BASE_CONFIG = replace(
            neural.BASE_CONFIG, encoder_path=args.encoder, policy=args.policy,
            small_batch=args.small_batch or neural.BASE_CONFIG.small_batch,
            item_tower=args.item_tower or neural.BASE_CONFIG.item_tower,
        )
        try:
            neural.BASE_CONFIG = replace(neural.BASE_CONFIG, **_overrides(args.set))
        except (TypeError, ValueError) as exc:
            parser.error(f"--set: {exc}")
    return methods, drift_methods, seeds, cfg


def _parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    parser = argparse.ArgumentParser(prog="bench.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/quality", help="folder for quality.json/.png")
    parser.add_argument("--events", type=int, default=None, help="use only the first N events")
    parser.add_argument(
        "--methods", default=None,
        help=f"comma-separated; default: {','.join(DEFAULT_METHODS)}; also: "
        f"{','.join(sorted(set(METHODS) - set(DEFAULT_METHODS)))}"
    )
    parser.add_argument(
        "--data", default=None, help="MovieLens folder (default: ML-100K, fetched once)"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="use the synthetic drifting stream"
    )
    parser.add_argument("--batch-size", type=int, default=256,
                        help="events per micro-batch (with --rate: the most per micro-batch)")
    parser.add_argument(
        "--rate", type=float, default=None,
        help="stream events/s: micro-batches close as the live trainer closes them at this rate "
        "(--batch-size events or --batch-window-ms after the first); default: fixed batches",
    )
    parser.add_argument("--batch-window-ms", type=float, default=1000 * BatchPolicy.window_s)
    parser.add_argument(
        "--item-tower", default=None, choices=("mlp", "linear"),
        help="item tower of the neural methods (default: the model's)",
    )
    parser.add_argument(
        "--small-batch", default=None, choices=("scale", "none"),
        help="how the neural methods learn a micro-batch under step_events (default: the model's)",
    )
    parser.add_argument("--warmup-passes", type=int, default=1)
    parser.add_argument("--window", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the methods and the same-second tie order")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds, one run each (tie order and model init "
                        "together), reported as means with 95%% intervals; overrides --seed")
    parser.add_argument("--drift-events", type=int, default=10_000,
                        help="events per regime of the recurring-drift stream (A, B, A)")
    parser.add_argument("--raw-out", default=None,
                        help="also write the raw per-seed runs (per-event hits) to this file")
    parser.add_argument("--merge", default=None,
                        help="comma-separated raw files (--raw-out) of runs with other seeds: "
                        "write their combined quality.json/.png to --out and run nothing")
    parser.add_argument("--drift-from", default=None,
                        help="with --merge: take the recurring-drift runs from these raw files "
                        "instead (comma-separated)")
    parser.add_argument("--no-drift", action="store_true",
                        help="skip the recurring-drift forgetting measure")
    parser.add_argument("--drift-methods", default=None,
                        help="methods run on the recurring-drift stream (default: those of "
                        "--methods that learn after warm-up)")
    parser.add_argument("--ties", default="hash", choices=("hash", "id"),
                        help="order of a user's same-second events: seeded hash (default) or "
                        "item id (the old order, which leaks the next item)")
    parser.add_argument("--no-loo", action="store_true", help="skip the leave-one-out protocol")
    parser.add_argument(
        "--encoder", default="", help="HF AutoModel folder for the neural methods (default MiniLM)"
    )
    parser.add_argument(
        "--policy", default="head", choices=("head", "lora", "full"),
        help="trainable scope of the neural methods (lora/full re-encode the catalog each step)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch intra-op threads for the neural methods (1: measured fastest on a shared "
        "2-core CPU, where a second thread waits on a busy core)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override a ModelConfig field of the neural methods (repeatable; the value is "
        "parsed as JSON, else kept as a string), e.g. --set history_len=30 --set lr=1e-3",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.quality [--out DIR] [--events N] [--methods a,b,c] ...``."""
    parser = _parser()
    args = parser.parse_args(argv)
    methods, drift_methods, seeds, cfg = _configure(parser, args)
    if args.merge:
        dataset = None
    elif args.synthetic:
        dataset = synthetic_stream(1000, 2000, args.events or 100_000, 20_000, args.seed)
    else:
        dataset = load_movielens(args.data or ml100k_dir())
    assert dataset is not None or args.merge

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if args.merge:
        raws = [json.loads(Path(f).read_text()) for f in args.merge.split(",") if f.strip()]
        raw = merge_raw(raws)
        if args.drift_from:
            raws = [json.loads(Path(f).read_text()) for f in args.drift_from.split(",") if f]
        drifts = [r["drift"] for r in raws if r.get("drift")]
        if drifts:
            from bench.drift import merge_drift_raw

            raw["drift"] = merge_drift_raw(drifts)
    else:
        raw = collect(dataset, methods, cfg, log=log, seeds=seeds)
        if not args.no_drift:
            from bench.drift import collect_drift

            raw["drift"] = collect_drift(drift_methods, seeds, args.drift_events, cfg, log=log)
        if args.raw_out:
            Path(args.raw_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.raw_out).write_text(json.dumps(raw))
    result = summarize(raw)
    if raw.get("drift"):
        from bench.drift import summarize_drift

        drift = summarize_drift(raw["drift"])
        result["recurring_drift"] = drift
        if drift["methods"]:
            pick = "incremental" if "incremental" in drift["methods"] else next(iter(drift["methods"]))
            result["forgetting"]["recurring_drift"] = {
                "method": pick, **drift["methods"][pick]["forgetting"]}
    json_path, png_path = write_outputs(result, args.out)
    p = result["protocol"]
    print(
        f"{p['dataset']}: {p['n_events']} events ({p['warmup_events']} warm-up, "
        f"{p['heldout_events']} held out, {p['stream_events']} stream), {p['n_items']} items"
    )
    print(format_table(result))
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
