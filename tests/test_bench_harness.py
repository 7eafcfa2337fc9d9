"""Tests of the quality harness (bench/quality.py) and the baselines (bench/baselines.py)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from bench import quality
from bench.baselines import Catalog, ImplicitALS, ItemKNN, Popularity, RiverMF, top_k
from bench.quality import Case, QualityConfig, forgetting, ndcg_at, run_method, split_warmup
from freshrec.data import Dataset, Interaction, Item, synthetic_stream


def tiny_dataset() -> Dataset:
    """Hand-made: users a, b in warm-up; c arrives in the stream; item i9 is new in the stream."""
    rows = [
        ("a", "i1"), ("a", "i2"), ("b", "i1"), ("a", "i3"), ("b", "i4"), ("b", "i5"),  # warm-up
        ("a", "i4"), ("c", "i1"), ("b", "i9"), ("c", "i9"), ("a", "i5"), ("c", "i2"),  # stream
    ]  # fmt: skip
    events = [Interaction(u, i, float(t)) for t, (u, i) in enumerate(rows)]
    items = [Item(f"i{n}", f"item {n}", {}) for n in range(1, 10)]
    return Dataset(items=items, interactions=events, name="tiny")


class Oracle:
    """Knows every user's sequence; finds the next item from how many items are excluded."""

    name = "oracle"
    wants_user_ids = True

    def __init__(self, events: Sequence[Interaction], rank: int = 1) -> None:
        self.seq: dict[str, list[str]] = defaultdict(list)
        for e in events:
            self.seq[e.user_id].append(e.item_id)
        self.rank = rank  # put the answer at this 1-based rank

    def add_items(self, items: Sequence[Item]) -> None:
        pass

    def learn(self, batch: Sequence[Interaction]) -> None:
        pass

    def rank_batch(self, histories, k, exclude, users=None):  # noqa: ANN001, ANN201
        out = []
        for user, excl in zip(users, exclude, strict=True):
            answer = self.seq[user][len(excl)]
            out.append(["filler"] * (self.rank - 1) + [answer])
        return out


class Never:
    """Recommends items that do not exist."""

    name = "never"

    def add_items(self, items: Sequence[Item]) -> None:
        pass

    def learn(self, batch: Sequence[Interaction]) -> None:
        pass

    def rank_batch(self, histories, k, exclude):  # noqa: ANN001, ANN201
        return [[f"nothing{n}" for n in range(k)] for _ in histories]


def cfg(**overrides: object) -> QualityConfig:
    base: dict[str, object] = {"batch_size": 2, "window": 2, "loo": True, "holdout": "last"}
    base.update(overrides)
    return QualityConfig(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Metrics


def test_ndcg_at() -> None:
    assert ndcg_at(["x", "y"], "x", 10) == (1.0, 1.0)
    hit, gain = ndcg_at(["x", "y"], "y", 10)
    assert hit == 1.0 and gain == pytest.approx(1 / math.log2(3))
    assert ndcg_at(["x", "y"], "z", 10) == (0.0, 0.0)
    assert ndcg_at(["x", "y", "z"], "z", 2) == (0.0, 0.0)  # beyond the cut-off


def test_oracle_scores_one_everywhere() -> None:
    ds = tiny_dataset()
    result = run_method("oracle", lambda c, q: Oracle(ds.interactions), ds, ds.interactions, cfg())
    assert result["hr@10"] == 1.0 and result["ndcg@10"] == 1.0
    for name, sl in result["slices"].items():
        assert sl["hr@10"] == 1.0, name
    assert result["forgetting"]["static_hr@10"] == 1.0
    assert result["forgetting"]["relative_drop"] == 0.0
    assert result["loo"]["hr@10"] == 1.0 and result["loo"]["val_hr@10"] == 1.0


def test_rank_two_gives_inverse_log_gain_and_never_gives_zero() -> None:
    ds = tiny_dataset()
    second = run_method(
        "o2", lambda c, q: Oracle(ds.interactions, rank=2), ds, ds.interactions, cfg()
    )
    assert second["hr@10"] == 1.0
    assert second["ndcg@10"] == pytest.approx(1 / math.log2(3))
    nothing = run_method("never", lambda c, q: Never(), ds, ds.interactions, cfg())
    assert nothing["hr@10"] == 0.0 and nothing["ndcg@10"] == 0.0 and nothing["loo"]["hr@10"] == 0.0


def test_slices_windows_and_heldout_of_the_tiny_case() -> None:
    ds = tiny_dataset()
    result = run_method("oracle", lambda c, q: Oracle(ds.interactions), ds, ds.interactions, cfg())
    # Stream: (a,i4) rest, (c,i1) new user, (b,i9) cold item, (c,i9) both, (a,i5) rest, (c,i2) new.
    assert result["slices"]["new_users"]["n"] == 3
    assert result["slices"]["cold_items"]["n"] == 2
    assert result["slices"]["rest"]["n"] == 2
    assert [(w["start"], w["end"], w["n"]) for w in result["windows"]] == [
        (0, 2, 2),
        (2, 4, 2),
        (4, 6, 2),
    ]
    split = split_warmup(ds.interactions, cfg())
    assert [(c.user_id, c.item_id, c.history, c.exclude) for c in split.heldout] == [
        ("a", "i3", ("i1", "i2"), frozenset({"i1", "i2"})),
        ("b", "i5", ("i1", "i4"), frozenset({"i1", "i4"})),
    ]
    assert [(e.user_id, e.item_id) for e in split.train] == [
        ("a", "i1"),
        ("a", "i2"),
        ("b", "i1"),
        ("b", "i4"),
    ]


# ---------------------------------------------------------------------------------------------
# Leak checks


class Spy:
    """Cheats with everything it is given or taught; any hit means the harness leaked."""

    name = "spy"
    wants_user_ids = True

    def __init__(self) -> None:
        self.learned: list[Interaction] = []
        self.by_user: dict[str, list[str]] = defaultdict(list)

    def add_items(self, items: Sequence[Item]) -> None:
        pass

    def learn(self, batch: Sequence[Interaction]) -> None:
        self.learned.extend(batch)
        for e in batch:
            self.by_user[e.user_id].append(e.item_id)

    def rank_batch(self, histories, k, exclude, users=None):  # noqa: ANN001, ANN201
        # Ignores `exclude` on purpose: the history and every item it learned for the user.
        return [
            list(h)[::-1] + self.by_user[u][::-1] for h, u in zip(histories, users, strict=True)
        ]


def test_ranking_never_sees_the_event_being_predicted() -> None:
    ds = synthetic_stream(30, 400, 1200, 300, seed=5)
    pairs = [(e.user_id, e.item_id) for e in ds.interactions]
    assert len(set(pairs)) == len(pairs)  # no repeats, so any hit is a leak
    spies: list[Spy] = []

    def factory(catalog: Sequence[Item], config: QualityConfig) -> Spy:
        spies.append(Spy())
        return spies[-1]

    config = QualityConfig(batch_size=64, window=200, loo=False)
    result = run_method("spy", factory, ds, ds.interactions, config)
    # Items repeat only when a user has seen everything, which 40 events per user never reach.
    assert result["hr@10"] == 0.0
    assert result["forgetting"]["incremental_hr@10"] == 0.0
    split = split_warmup(ds.interactions, config)
    model = spies[0]
    # Each trained event exactly once, in event order; the held-out events never.
    assert model.learned == split.train + split.stream


def test_frozen_after_warmup_learns_the_warmup_only() -> None:
    ds = synthetic_stream(30, 400, 1200, 300, seed=5)
    spies: list[Spy] = []

    def factory(catalog: Sequence[Item], config: QualityConfig) -> Spy:
        spies.append(Spy())
        return spies[-1]

    config = QualityConfig(batch_size=64, window=200)
    result = run_method("static", quality.frozen_after_warmup(factory), ds, ds.interactions, config)
    split = split_warmup(ds.interactions, config)
    prequential_spy, loo_spy = spies
    assert prequential_spy.learned == split.train
    assert len(loo_spy.learned) == result["loo"]["train_events"]  # LOO never freezes
    assert result["forgetting"]["relative_drop"] is None  # the spy never hits held-out events


def test_stream_histories_include_same_batch_events_and_warmup() -> None:
    ds = tiny_dataset()
    seen: list[tuple[tuple[str, ...], frozenset[str]]] = []

    class Recorder(Never):
        def rank_batch(self, histories, k, exclude):  # noqa: ANN001, ANN201
            seen.extend((tuple(h), frozenset(x)) for h, x in zip(histories, exclude, strict=True))
            return super().rank_batch(histories, k, exclude)

    run_method("rec", lambda c, q: Recorder(), ds, ds.interactions, cfg(batch_size=6, loo=False))
    stream_cases = seen[:6]  # the stream is ranked first, the held-out cases after it
    assert len(seen) == 6 + 2 + 2  # then held-out for the static twin and the streamed model
    assert stream_cases[0] == (
        ("i1", "i2", "i3"),
        frozenset({"i1", "i2", "i3"}),
    )  # held-out i3 counts
    assert stream_cases[3] == (("i1",), frozenset({"i1"}))  # (c, i9) sees (c, i1) of its own batch


# ---------------------------------------------------------------------------------------------
# forgetting()


def test_forgetting_is_the_relative_drop_of_heldout_hits() -> None:
    heldout = [Case(str(u), "t", (), frozenset()) for u in range(4)]

    class HitsFor(Never):
        wants_user_ids = True

        def __init__(self, users: set[str]) -> None:
            self.users = users

        def rank_batch(self, histories, k, exclude, users=None):  # noqa: ANN001, ANN201
            return [["t"] if u in self.users else ["x"] for u in users]

    out = forgetting(HitsFor({"0", "1", "2", "3"}), HitsFor({"0", "1"}), heldout, k=10)
    assert out["static_hr@10"] == 1.0 and out["incremental_hr@10"] == 0.5
    assert out["relative_drop"] == pytest.approx(0.5)
    assert forgetting(HitsFor(set()), HitsFor({"0"}), heldout)["relative_drop"] is None


# ---------------------------------------------------------------------------------------------
# Baselines


def test_top_k_skips_excluded_and_orders_by_score() -> None:
    catalog = Catalog()
    catalog.add(["a", "b", "c", "d"])
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert top_k(scores, 2, [{"a"}, set()], catalog) == [["b", "c"], ["d", "c"]]
    scores = np.array([[4.0, 3.0, 2.0, 1.0]])
    assert top_k(scores, 10, [{"a", "b", "c"}], catalog) == [["d"]]


def test_itemknn_ranks_co_occurring_items_first() -> None:
    knn = ItemKNN(window=5)
    knn.add_items([Item(i, i, {}) for i in "abcdef"])
    events = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "c"), ("u3", "d"),
              ("u4", "e"), ("u5", "e"), ("u6", "e"), ("u3", "e")]  # fmt: skip
    knn.learn([Interaction(u, i, float(t)) for t, (u, i) in enumerate(events)])
    assert knn.co[0, 1] == knn.co[1, 0] == 2.0  # symmetric counts of (a, b)
    assert knn.rank_batch([["a"]], 1, [{"a"}]) == [["b"]]  # despite e being more popular
    assert knn.rank_batch([[]], 1, [set()]) == [["e"]]  # no history: popularity
    assert knn.rank_batch([["d", "c"]], 2, [{"c", "d"}]) == [["e", "a"]]


def test_popularity_counts_and_excludes() -> None:
    pop = Popularity()
    pop.add_items([Item(i, i, {}) for i in "abc"])
    pop.learn([Interaction("u", i, 0.0) for i in "bbbcc"])
    assert pop.rank_batch([[], []], 2, [set(), {"b"}]) == [["b", "c"], ["c", "a"]]


def test_river_mf_vectorised_ranking_matches_predict_one() -> None:
    ds = synthetic_stream(20, 30, 600, 0, seed=2)
    mf = RiverMF(n_factors=8, seed=1)
    mf.add_items(ds.items)
    for start in range(0, 600, 100):
        mf.learn(ds.interactions[start : start + 100])
    user = ds.interactions[0].user_id
    ranked = mf.rank_batch([[]], 30, [set()], users=[user])[0]
    by_predict = sorted(
        (it.item_id for it in ds.items), key=lambda i: -mf.model.predict_one(user, i)
    )
    assert ranked == by_predict
    assert "never-seen-user" not in mf.model.u_latents
    mf.rank_batch([["1"]], 5, [set()], users=["never-seen-user"])
    assert "never-seen-user" not in mf.model.u_latents  # ranking must not create users


def test_itemknn_beats_popularity_on_a_sequential_stream() -> None:
    ds = synthetic_stream(200, 400, 12000, 3000, seed=1, n_topics=10, topic_affinity=0.95)
    config = QualityConfig(window=2000, loo=False)
    knn = run_method("itemknn", lambda c, q: ItemKNN(), ds, ds.interactions, config)
    pop = run_method("popularity", lambda c, q: Popularity(), ds, ds.interactions, config)
    assert knn["hr@10"] > 1.5 * pop["hr@10"], (knn["hr@10"], pop["hr@10"])


# ---------------------------------------------------------------------------------------------
# main()


def test_main_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    code = quality.main(["--synthetic", "--events", "3000", "--methods", "popularity,itemknn,river_mf",
                         "--window", "500", "--out", str(out), "--seeds", "0,1",
                         "--drift-events", "600", "--drift-methods", "popularity,itemknn"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "quality.json").read_text())
    assert set(result) == {"protocol", "methods", "forgetting", "comparisons", "recurring_drift"}
    assert list(result["methods"]) == ["popularity", "itemknn", "river_mf"]
    for m in result["methods"].values():
        assert {"hr@10", "ndcg@10", "events_per_s", "wall_s", "slices", "windows", "loo"} <= set(m)
        assert set(m["slices"]) == {"new_users", "cold_items", "rest"}
        assert set(m["loo"]) >= {"hr@10", "ndcg@10", "hr@10_ci", "seen_included"}
        assert len(m["windows"]) == 3 and m["events_per_s"] > 0
        lo, hi = m["hr@10_ci"]
        assert lo <= m["hr@10"] <= hi and len(m["hr@10_seeds"]) == 2
        assert m["hr@10"] == pytest.approx(sum(m["hr@10_seeds"]) / 2)
        assert not any(key.startswith("_") for key in m) and "_per_event" not in m["loo"]
    assert "relative_drop" in result["forgetting"]
    assert {"user_disjoint", "recurring_drift"} <= set(result["forgetting"])
    assert set(result["forgetting"]["recurring_drift"]) >= {"relative_drop", "ci"}
    assert result["protocol"]["n_events"] == 3000
    assert result["protocol"]["seeds"] == [0, 1] and result["protocol"]["ties"] == "hash"
    assert result["comparisons"] == {}  # nothing to compare without `incremental`
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "itemknn" in capsys.readouterr().out


def test_main_rejects_unknown_methods(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        quality.main(["--synthetic", "--methods", "nope", "--out", str(tmp_path)])


def test_registry_accepts_new_methods(tmp_path: Path) -> None:
    ds = tiny_dataset()
    quality.register("test-oracle", lambda c, q: Oracle(ds.interactions))
    try:
        result = quality.run_quality(ds, ["test-oracle"], cfg())
    finally:
        del quality.METHODS["test-oracle"]
    assert result["methods"]["test-oracle"]["hr@10"] == 1.0
    assert result["forgetting"]["method"] == "test-oracle"


class Recorder(Never):
    """Remembers the order in which it learned events."""

    learned: list[Interaction] = []

    def learn(self, batch: Sequence[Interaction]) -> None:
        Recorder.learned.extend(batch)


def test_live_bench_offline_side_keeps_the_live_order() -> None:
    """`freshrec bench live` compares the live replay with the offline run on the same events in
    the same order; the offline side once re-sorted them by the seed-0 tie hash, so any other
    seed compared different streams."""
    from bench import live

    ds = tiny_dataset()
    same_second = [Interaction("a", f"i{n}", 5.0) for n in (9, 3, 7, 1, 5, 2, 8)]
    events = ds.interactions[:6] + same_second  # not in any hash order
    quality.register("recorder", lambda catalog, qcfg: Recorder())
    Recorder.learned = []
    try:
        per_event = live.offline(ds, events, n_warm=6, rate=100.0, methods=["recorder"])
    finally:
        quality.METHODS.pop("recorder")
    assert Recorder.learned == events, "the offline side learned another order"
    assert len(per_event["recorder"]) == len(same_second)


# ---------------------------------------------------------------------------------------------
# Decayed popularity, the user-disjoint held-out set, the ALS peer, the drift stream


def test_popularity_decays_with_its_half_life() -> None:
    pop = Popularity(halflife=1.0)
    pop.add_items([Item(i, i, {}) for i in "ab"])
    pop.learn([Interaction("u", "a", 0.0)] * 3)
    assert pop.counts[0] == pytest.approx(0.25 + 0.5 + 1.0)  # the newest event counts 1
    pop.learn([Interaction("u", "b", 1.0)] * 2)
    assert pop.counts.tolist() == pytest.approx([1.75 * 0.25, 0.5 + 1.0])
    assert pop.rank_batch([[]], 1, [set()]) == [["b"]]  # recent beats more but older
    alltime = Popularity()
    alltime.add_items([Item(i, i, {}) for i in "ab"])
    alltime.learn([Interaction("u", "a", 0.0)] * 3 + [Interaction("u", "b", 1.0)] * 2)
    assert alltime.rank_batch([[]], 1, [set()]) == [["a"]]
    with pytest.raises(ValueError):
        Popularity(halflife=-1.0)


def test_the_user_disjoint_heldout_users_never_return() -> None:
    rows = [("x", f"i{n}") for n in range(10)] + [("y", "i1"), ("y", "i2"), ("z", "i3")]
    rows += [("y", "i5"), ("w", "i6")]  # the stream: y returns, w is new
    events = [Interaction(u, i, float(t)) for t, (u, i) in enumerate(rows)]
    config = QualityConfig(warmup_events=13, holdout_frac=0.2)
    split = split_warmup(events, config)
    # x never returns: its last 20% (2 events) are held out; y returns; z has one event only
    assert [(c.user_id, c.item_id) for c in split.heldout] == [("x", "i8"), ("x", "i9")]
    assert split.heldout[1].history == tuple(f"i{n}" for n in range(9))  # i8 happened
    assert len(split.train) == 11 and {e.user_id for e in split.stream} == {"y", "w"}
    big = synthetic_stream(2000, 400, 3000, 0, seed=3)  # many users: some never return
    split = split_warmup(big.interactions, QualityConfig())
    stream_users = {e.user_id for e in split.stream}
    assert split.heldout and not {c.user_id for c in split.heldout} & stream_users
    assert not {(c.user_id, c.item_id) for c in split.heldout} & {
        (e.user_id, e.item_id) for e in split.train}


def test_als_folds_users_in_and_retrains_every_w_events() -> None:
    ds = synthetic_stream(60, 80, 3000, 0, seed=4, n_topics=4, topic_affinity=1.0)
    als = ImplicitALS(factors=8, iterations=5, retrain_every=1000, seed=0)
    als.add_items(ds.items)
    for start in range(0, 3000, 250):
        als.learn(ds.interactions[start : start + 250])
    assert als.fits == 3
    topic = {it.item_id: it.fields["topic"] for it in ds.items}
    history = [it.item_id for it in ds.items if topic[it.item_id] == 0][:5]
    ranked = als.rank_batch([history], 10, [set(history)], users=["a-new-user"])[0]
    assert len(ranked) == 10 and not set(ranked) & set(history)
    # a new user is folded in from their history alone: mostly the history's topic
    assert sum(topic[i] == 0 for i in ranked) >= 7, [topic[i] for i in ranked]


def test_recurring_drift_stream_regimes_and_probe() -> None:
    from bench.drift import recurring_drift_stream

    stream = recurring_drift_stream(n_users=50, n_items=160, per_regime=1000, seed=1,
                                    n_topics=8, topic_affinity=1.0, probe_frac=0.2,
                                    probe_events=3)
    events = stream.dataset.interactions
    assert [(r, s, e) for r, s, e in stream.bounds] == [("A", 0, 1000), ("B", 1000, 2000),
                                                        ("A", 2000, 3000)]
    probe_users = {events[p].user_id for p in stream.probe}
    assert probe_users and all(int(u) < 10 for u in probe_users)
    assert max(stream.probe) < 1000 and len(stream.probe) == 3 * len(probe_users)
    assert not probe_users & {e.user_id for e in events[1000:]}  # they never come back
    topic = {it.item_id: it.fields["topic"] for it in stream.dataset.items}
    last: dict[str, int] = {}
    same = {"A": 0, "B": 0}
    for pos, e in enumerate(events):
        regime = "A" if pos < 1000 or pos >= 2000 else "B"
        if e.user_id in last and last[e.user_id] == topic[e.item_id]:
            same[regime] += 1
        last[e.user_id] = topic[e.item_id]
    assert same["B"] == 0 and same["A"] > 1500  # B alternates between paired topics


def test_runs_of_separate_seeds_merge_into_the_joint_result(tmp_path: Path) -> None:
    common = ["--synthetic", "--events", "2000", "--methods", "popularity,itemknn", "--window",
              "500", "--no-loo", "--drift-events", "400", "--drift-methods", "itemknn"]
    for seed in ("0", "1"):
        assert quality.main(common + ["--seeds", seed, "--out", str(tmp_path / seed),
                                      "--raw-out", str(tmp_path / f"raw{seed}.json")]) == 0
    assert quality.main(common + ["--seeds", "0,1", "--out", str(tmp_path / "joint")]) == 0
    assert quality.main(["--merge", f"{tmp_path / 'raw0.json'},{tmp_path / 'raw1.json'}",
                         "--out", str(tmp_path / "merged")]) == 0
    joint = json.loads((tmp_path / "joint" / "quality.json").read_text())
    merged = json.loads((tmp_path / "merged" / "quality.json").read_text())
    for name in ("popularity", "itemknn"):
        a, b = joint["methods"][name], merged["methods"][name]
        assert a["hr@10_seeds"] == b["hr@10_seeds"] and a["hr@10_ci"] == b["hr@10_ci"]
    assert merged["protocol"]["seeds"] == [0, 1]
    assert merged["forgetting"]["recurring_drift"]["relative_drop"] == pytest.approx(
        joint["forgetting"]["recurring_drift"]["relative_drop"])


def test_raw_runs_of_other_methods_merge_too() -> None:
    ds = tiny_dataset()
    one = quality.collect(ds, ["popularity"], cfg(loo=False), seeds=[0, 1])
    two = quality.collect(ds, ["itemknn"], cfg(loo=False), seeds=[0, 1])
    both = quality.collect(ds, ["popularity", "itemknn"], cfg(loo=False), seeds=[0, 1])
    merged = quality.summarize(quality.merge_raw([one, two]))
    joint = quality.summarize(both)
    assert list(merged["methods"]) == ["popularity", "itemknn"]
    for name in ("popularity", "itemknn"):
        assert merged["methods"][name]["hr@10_seeds"] == joint["methods"][name]["hr@10_seeds"]
    with pytest.raises(ValueError, match="every method needs every seed"):
        quality.merge_raw([one, quality.collect(ds, ["itemknn"], cfg(loo=False), seeds=[0])])


def test_set_reaches_neural_methods_run_on_the_drift_stream_only() -> None:
    """``--set`` configures the neural methods even when only --drift-methods names one (it
    used to be applied only when --methods held a neural method, so drift runs silently used
    the defaults)."""
    pytest.importorskip("torch")
    from bench import neural

    saved = neural.BASE_CONFIG
    try:
        parser = quality._parser()
        args = parser.parse_args(["--methods", "popularity", "--drift-methods", "incremental",
                                  "--set", "lr=0.0042", "--set", "replay_ratio=1.0"])
        methods, drift_methods, _, _ = quality._configure(parser, args)
        assert (methods, drift_methods) == (["popularity"], ["incremental"])
        assert (neural.BASE_CONFIG.lr, neural.BASE_CONFIG.replay_ratio) == (0.0042, 1.0)
        made = quality.METHODS["incremental"]([], QualityConfig())
        assert made.cfg.lr == 0.0042  # what the drift run builds
        with pytest.raises(SystemExit):  # an unknown drift method is refused up front
            quality._configure(parser, parser.parse_args(["--drift-methods", "nope"]))
    finally:
        neural.BASE_CONFIG = saved
