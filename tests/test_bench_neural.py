"""The neural methods of the quality benchmark (bench/neural.py), end to end on a tiny stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from bench import neural, quality
from bench.neural import NeuralRecommender
from bench.quality import QualityConfig, prequential, run_quality, split_warmup
from freshrec.data import synthetic_stream
from model.config import ModelConfig

NAMES = ("static", *quality.NEURAL_METHODS)


@pytest.fixture
def tiny_base(tiny_encoder_path: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelConfig]:
    """The tiny BERT as every neural method's encoder; one torch thread, as the benchmark uses
    (on a busy 2-core machine a second thread made these steps ~30x slower)."""
    base = ModelConfig(encoder_path=tiny_encoder_path, negatives=16, replay_size=500)
    monkeypatch.setattr(neural, "BASE_CONFIG", base)
    monkeypatch.setattr(neural, "RETRAIN_EVERY", 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield base
    torch.set_num_threads(threads)


def test_every_neural_method_is_registered() -> None:
    assert set(NAMES) <= set(quality.METHODS)
    assert {"incremental-no-replay", "incremental-no-anchor", "incremental-anchor", "incremental-adaptive-lr",
            "incremental-id-only", "retrain"} <= set(NAMES)


def test_neural_methods_run_end_to_end(tiny_base: ModelConfig) -> None:
    t0 = time.monotonic()
    ds = synthetic_stream(n_users=40, n_items=60, n_events=1200, drift_every=400, seed=1)
    cfg = QualityConfig(batch_size=64, window=300, seed=0)
    result = run_quality(ds, list(NAMES), cfg)
    for name in NAMES:
        m = result["methods"][name]
        assert 0.0 <= m["hr@10"] <= 1.0 and m["slices"]["rest"]["n"] > 0, name
        assert 0.0 <= m["loo"]["hr@10"] <= 1.0, name
        assert len(m["windows"]) == 2, name
    inc = result["methods"]["incremental"]["stats"]
    assert inc["publishes"] + inc["gate_refusals"] == inc["batches"] // neural.PUBLISH_EVERY
    assert result["methods"]["retrain"]["stats"]["retrains"] == 600 // 256
    assert result["forgetting"]["method"] == "incremental"
    assert time.monotonic() - t0 < 60, "measured ~9 s on the 2-core CPU"


def test_rankings_never_see_the_event_being_predicted(tiny_base: ModelConfig) -> None:
    """The harness ranks each micro-batch before the learner learns it, and the learner's own
    histories are the harness's minus the held-out warm-up events (learned by no method)."""
    log: list[tuple[str, float]] = []

    class Spy(NeuralRecommender):
        def rank_batch(self, histories, k, exclude):  # noqa: ANN001, ANN202
            log.append(("rank", self.learner.total))
            return super().rank_batch(histories, k, exclude)

        def learn(self, batch):  # noqa: ANN001, ANN202
            log.append(("learn", self.learner.total))
            super().learn(batch)

    ds = synthetic_stream(n_users=30, n_items=50, n_events=600, drift_every=0, seed=2)
    cfg = QualityConfig(batch_size=50, window=100, loo=False)
    split = split_warmup(ds.interactions, cfg)
    model = Spy(replace(tiny_base, history_len=8, negative_history_len=0))  # keeps 8 per user
    model.add_items(ds.items)
    for start in range(0, len(split.train), cfg.batch_size):
        model.learn(split.train[start:start + cfg.batch_size])
    log.clear()
    prequential(model, split, cfg)
    ranks = [total for kind, total in log if kind == "rank"]
    learns = [total for kind, total in log if kind == "learn"]
    assert ranks == learns, "each batch is ranked with exactly the events before it learned"
    assert ranks == [len(split.train) + cfg.batch_size * i for i in range(len(ranks))]
    learned: dict[str, list[str]] = {}
    for e in split.train + split.stream:
        learned.setdefault(e.user_id, []).append(e.item_id)
    for user, items in learned.items():
        assert model.learner.history(user) == items[-8:], user


def test_set_overrides_parse_json_values_and_keep_strings() -> None:
    """`--set FIELD=VALUE` (the dev sweep's knob): JSON values, else the raw string; a pair
    without '=' is an error, and the result builds a ModelConfig."""
    got = quality._overrides(["lr=1e-3", "history_not_negative=true", "item_tower=linear",
                              "negative_history_len=100"])
    assert got == {"lr": 0.001, "history_not_negative": True, "item_tower": "linear",
                   "negative_history_len": 100}
    assert replace(ModelConfig(), **got).negative_history_len == 100
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        quality._overrides(["lr"])
