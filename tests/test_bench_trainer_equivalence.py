"""The quality benchmark's learner loop and the live trainer learn the same weights (issue 10 #6).

The same events go through both:

- the benchmark: `bench.neural.NeuralRecommender` driven by `bench.quality.prequential`, the
  stream loop `freshrec bench quality` runs (rank a micro-batch, then learn it, then gate and
  publish or roll back);
- the trainer: `consumers.trainer.Trainer.on_poll`, the entry point its Kafka loop calls with
  each poll, against a real Redis (weights and features go there; Kafka is left out: the polls
  are built here, each record arriving at its own time on an exact clock).

Both must close the same micro-batches, reach the same gate verdicts and end with equal
tensors. At a rate both publish on the arrival clock at most every interval; the fixed
micro-batches of the benchmark's default mode have no clock, so there both publish after every
micro-batch. The gate is tuned to judge early and to refuse now and then, so rollback is on the
path too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import redis
import torch
from kafka.structs import TopicPartition

from bench.neural import NeuralRecommender
from bench.quality import QualityConfig, WarmupSplit, prequential
from consumers.loop import Polled
from consumers.settings import TrainerSettings
from consumers.trainer import Trainer
from freshrec.data import synthetic_stream
from model.config import ModelConfig
from model.encoder import TextEncoder
from model.events import Interaction, Item
from model.learner import GateDecision, OnlineLearner
from protocol.features import FeatureStore
from protocol.topics import Source
from protocol.weights import WeightStore
from tests.helpers import HMAC_KEY

TOPIC = "interactions"


@dataclass(frozen=True)
class Scenario:
    """How events arrive: `rate` events/s (None: the benchmark's fixed micro-batches)."""

    rate: float | None
    max_events: int
    window_s: float
    publish_s: float  # at most one publish per this much of the clock (fixed: every batch)


SCENARIOS = {
    "fixed": Scenario(None, 32, 0.15, 0.0),
    # micro-batches close by time (9 events); publishes come between them, at arrivals
    "slow": Scenario(60.0, 32, 0.15, 0.25),
    "slow-every-batch": Scenario(60.0, 32, 0.15, 0.0),
    "fast": Scenario(400.0, 32, 0.15, 0.1),  # they close by size; a publish per ~1.3 batches
}


@dataclass
class Record:
    """What one side did: each micro-batch learned and each gate verdict, in order."""

    batches: list[list[Interaction]]
    verdicts: list[GateDecision]
    learner: OnlineLearner


def recorded(learner: OnlineLearner) -> Record:
    """Spy on the two learner verbs that decide the weights, without changing them."""
    rec = Record([], [], learner)
    learn, gate = learner.learn, learner.gate

    def spy_learn(batch):  # noqa: ANN001, ANN202
        rec.batches.append(list(batch))
        return learn(batch)

    def spy_gate(*args: Any) -> GateDecision:
        rec.verdicts.append(gate(*args))
        return rec.verdicts[-1]

    learner.learn = spy_learn  # type: ignore[method-assign]
    learner.gate = spy_gate  # type: ignore[method-assign]
    return rec


@pytest.fixture
def cfg(tiny_encoder_path: str) -> ModelConfig:
    """A small reservoir (it fills and starts replacing), and a gate that judges from 20
    held-out events and refuses any candidate below the published HR@10 (no significance)."""
    return ModelConfig(encoder_path=tiny_encoder_path, negatives=16, replay_size=60,
                       gate_holdout=4, gate_set=40, gate_min_events=20, gate_tolerance=0.0,
                       gate_z=0.0, seed=3)


@pytest.fixture(scope="module")
def stream() -> tuple[list[Item], list[Interaction]]:
    ds = synthetic_stream(n_users=25, n_items=40, n_events=400, drift_every=150, seed=5)
    return list(ds.items), list(ds.interactions)


def through_benchmark(cfg: ModelConfig, sc: Scenario, items: list[Item],
                      events: list[Interaction]) -> Record:
    """The benchmark's stream loop (`freshrec bench quality --rate R` after the warm-up)."""
    model = NeuralRecommender(cfg, rate=sc.rate, publish_every=1, publish_interval_s=sc.publish_s)
    rec = recorded(model.learner)
    model.add_items(items)
    model.end_warmup()
    qcfg = QualityConfig(batch_size=sc.max_events, batch_window_s=sc.window_s, rate=sc.rate,
                         publish_interval_s=sc.publish_s, loo=False, window=100)
    prequential(model, WarmupSplit(train=[], heldout=[], stream=events, all_warmup=[]), qcfg)
    return rec


def through_trainer(cfg: ModelConfig, sc: Scenario, items: list[Item],
                    events: list[Interaction], redis_url: str, namespace: str) -> Record:
    """`Trainer.on_poll`, one poll per arrival (fixed: one poll per micro-batch), then an empty
    poll when the open micro-batch's window runs out, as in the benchmark."""
    window_ms = round(1000 * sc.window_s) if sc.rate else 10**9
    s = TrainerSettings(redis_url=redis_url, namespace=namespace, hmac_key=HMAC_KEY,
                        encoder_path=cfg.encoder_path, trainer_metrics_port=0,
                        batch_max_events=sc.max_events, batch_window_ms=window_ms,
                        publish_interval_ms=round(1000 * sc.publish_s))
    client = redis.Redis.from_url(redis_url)
    learner = OnlineLearner(cfg, TextEncoder(cfg.encoder_path, cfg.max_text_tokens, cfg.policy),
                            device="cpu")
    rec = recorded(learner)
    trainer = Trainer(s, learner, WeightStore(client, HMAC_KEY.encode(), namespace),
                      FeatureStore(client, namespace))
    per_poll = 1 if sc.rate else sc.max_events
    tp = TopicPartition(TOPIC, 0)
    for start in range(0, len(events), per_poll):
        chunk = events[start:start + per_poll]
        polled = Polled(
            interactions=[(Source(TOPIC, 0, start + k, 0), e) for k, e in enumerate(chunk)],
            items=[(Source("items", 0, k, 0), it) for k, it in enumerate(items)] if not start
            else [],  # the catalog comes first, as the features consumer stored it
            offsets={tp: start + len(chunk)})
        # the clock as `arrival_polls` computes it: i * (1 / rate) can differ in the last bit
        trainer.on_poll(polled, now=start / sc.rate if sc.rate else float(start))
    if len(trainer.batcher):
        trainer.on_poll(Polled(), now=trainer.batcher.closes_at())
    assert trainer.published, "the trainer never published"
    assert trainer.events_total == len(events) and not len(trainer.batcher)
    return rec


def assert_same(bench: Record, live: Record) -> None:
    assert [len(b) for b in bench.batches] == [len(b) for b in live.batches], \
        "the micro-batch boundaries differ"
    assert bench.batches == live.batches
    assert bench.verdicts == live.verdicts, "the gate judged differently"
    assert bench.learner.item_ids == live.learner.item_ids
    ours, theirs = bench.learner.state_tensors(), live.learner.state_tensors()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_benchmark_and_the_trainer_learn_the_same_weights(
        name: str, cfg: ModelConfig, stream: tuple[list[Item], list[Interaction]],
        redis_url: str, namespace: str) -> None:
    items, events = stream
    sc = SCENARIOS[name]
    bench = through_benchmark(cfg, sc, items, events)
    live = through_trainer(cfg, sc, items, events, redis_url, namespace)
    assert sum(map(len, bench.batches)) == len(events)
    assert any(v.events for v in bench.verdicts), "the gate never judged: a weak test"
    assert any(not v.publish for v in bench.verdicts), "the gate never refused: a weak test"
    assert_same(bench, live)
