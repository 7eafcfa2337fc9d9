"""freshrec's own learner in the quality harness: static, incremental and its ablations, retrain.

Every neural method wraps one `model.learner.OnlineLearner` behind the harness's interface:

- `rank_batch` ranks with the histories and exclusions the harness gives (identical for every
  method: the user's items before the event, earlier events of the same micro-batch included).
- `learn(batch)` runs the trainer consumer's loop body (`consumers/trainer.py`): `learn`, and
  every `publish_every` batches `gate()` -> `mark_published()` or `rollback()`. With a rate,
  the harness calls `tick(now)` after every simulated poll instead, and it publishes as the
  trainer does (`model.batching.publish_due`). The gate ranks its own held-out events (one in
  16, see `OnlineLearner.holds_out`), exactly as in the trainer. The harness always ranks a
  batch before it calls `learn` on it, so the state that ranks never includes the event.
  tests/test_bench_trainer_equivalence.py checks that this loop and `Trainer.on_poll` end
  with the same weights.
- The learner keeps its own user histories, built from the events it learns; these are the
  harness's histories minus the held-out warm-up events, which no method learns (item-KNN keeps
  its own history the same way).

The frozen MiniLM encodes the catalog once per process; every learner gets the same features
(`set_text_features`), so only the `lora` / `full` policies, whose encoder trains, encode again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from freshrec.data import Interaction, Item
from model.batching import publish_due
from model.config import ModelConfig
from model.encoder import TextEncoder
from model.learner import GateDecision, OnlineLearner

__all__ = ["BASE_CONFIG", "BATCH_EVENTS", "PUBLISH_EVERY", "RETRAIN_EVERY", "NeuralRecommender", "Retrain",
           "neural_factories"]

BATCH_EVENTS = 256  # N: the trainer's batch_max_events; the harness's micro-batch must match
PUBLISH_EVERY = 4  # P: batches per simulated publish (a publish per ~1,000 events)
RETRAIN_EVERY = 5_000  # W: stream events between two from-scratch retrains (one per window)

_ENCODERS: dict[tuple[str, int], TextEncoder] = {}
_FEATURES: dict[tuple[str, int], dict[str, tuple[str, np.ndarray]]] = {}


def shared_encoder(cfg: ModelConfig) -> TextEncoder:
    """One frozen encoder per (path, max tokens) for the whole process (head policy only)."""
    key = (cfg.encoder_path, cfg.max_text_tokens)
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder(cfg.encoder_path, cfg.max_text_tokens, "head")
    return _ENCODERS[key]


def shared_features(cfg: ModelConfig, items: Sequence[Item]) -> dict[str, np.ndarray]:
    """Frozen text features of `items`, encoding only texts this process has not encoded yet."""
    key = (cfg.encoder_path, cfg.max_text_tokens)
    cache = _FEATURES.setdefault(key, {})
    todo = [it for it in items if it.item_id not in cache or cache[it.item_id][0] != it.text]
    if todo:
        vecs = shared_encoder(cfg).encode([it.text for it in todo])
        for it, vec in zip(todo, vecs, strict=True):
            cache[it.item_id] = (it.text, vec)
    return {it.item_id: cache[it.item_id][1] for it in items}


class NeuralRecommender:
    """An `OnlineLearner` driven as the trainer consumer drives it (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, name: str = "incremental",
                 publish_every: int | None = PUBLISH_EVERY, rate: float | None = None,
                 publish_interval_s: float = 0.25) -> None:
        self.name = name
        self.cfg = cfg
        self.publish_every = publish_every  # None: never publish
        # with a rate, publish as the trainer does (`tick`): after a poll, if anything was
        # learned and publish_interval_s of the arrival clock passed since the last publish
        self.rate, self.publish_interval_s = rate, publish_interval_s
        self.unpublished = 0  # events learned since the last publish or refusal
        self._published_at = 0.0
        encoder = shared_encoder(cfg) if cfg.policy == "head" else None
        self.learner = OnlineLearner(cfg, encoder, device="cpu")
        self.batches = 0
        self.streaming = False
        self.publishes = self.refusals = 0
        self.obey = True  # False: publish whatever the gate says (bench/gate.py's ungated run)
        self.learner_s = 0.0  # time inside learner.learn alone (the harness times all of learn)
        self.gate_s = 0.0  # time spent on the gate: ranking its held-out events, publishing

    def __deepcopy__(self, memo: dict[int, Any]) -> NeuralRecommender:
        if self.cfg.policy == "head":  # the frozen encoder is shared, never copied
            memo[id(self.learner.encoder)] = self.learner.encoder
        clone = copy.copy(self)
        clone.__dict__ = copy.deepcopy(self.__dict__, memo)
        return clone

    def add_items(self, items: Sequence[Item]) -> None:
        """Head policy: install the shared features; lora/full: the learner encodes itself."""
        if self.cfg.policy == "head":
            self.learner.set_text_features(shared_features(self.cfg, items),
                                           {it.item_id: it.text for it in items})
        else:
            self.learner.add_items(items)

    def rank_batch(self, histories: Sequence[Sequence[str]], k: int,
                   exclude: Sequence[Collection[str]]) -> list[list[str]]:
        """Top-k over the catalog from the harness's histories, with the weights as they are."""
        return self.learner.rank_batch(histories, k, exclude)

    def learn(self, batch: Sequence[Interaction]) -> None:
        """The trainer's loop body: learn, and publish every P batches if the gate passes (with
        a rate, after warm-up: when `tick` says).

        (The trainer also `evaluate`s each batch before learning it, for its online HR@10
        metric; the harness has just ranked the batch itself, and the gate does not use it.)"""
        t0 = time.perf_counter()
        self.learner.learn(batch)
        self.learner_s += time.perf_counter() - t0
        self.batches += 1
        self.unpublished += len(batch)
        on_clock = self.rate is not None and self.streaming
        if self.publish_every and not on_clock and self.batches % self.publish_every == 0:
            self._publish()

    def tick(self, now: float) -> None:
        """A simulated poll at `now` on the stream's arrival clock (after the micro-batches it
        closed were learned): publish if the trainer would."""
        if self.publish_every and self.rate is not None and self.streaming and self.unpublished \
                and publish_due(now, self._published_at, 1000 * self.publish_interval_s):
            self._published_at = now
            self._publish()

    def _publish(self) -> None:
        """Gate the current weights: publish them, or roll back to the last published ones
        (with `obey` off, publish whatever the gate says: an ungated run)."""
        t0 = time.perf_counter()
        decision = self.learner.gate()
        if decision.publish or not self.obey:
            self.learner.mark_published()
            self.publishes += 1
        else:
            self.learner.rollback()
            self.refusals += 1
        self.unpublished = 0
        self.gate_s += time.perf_counter() - t0
        self._verdict(decision)

    def _verdict(self, decision: GateDecision) -> None:
        """Called after each gated publish or refusal (bench/gate.py logs them)."""

    def end_warmup(self) -> None:
        """The stream starts: from now on batches arrive on the rate's clock."""
        self.streaming = True
        self._published_at = 0.0

    def stats(self) -> dict[str, Any]:
        """Extra numbers for quality.json."""
        return {"batches": self.batches, "publishes": self.publishes,
                "gate_refusals": self.refusals, "learner_s": self.learner_s,
                "gate_s": self.gate_s,
                "publish_every_batches": self.publish_every}


class Retrain:
    """freshrec retrained from scratch on every event so far, each `every` stream events.

    Until `end_warmup` it is a plain incremental learner (the harness's warm-up, and leave-one-out
    where a retrain from scratch on the training events is exactly one pass of that); afterwards
    it only buffers events between retrains, so its rankings are stale by up to `every` events.
    """

    wants_user_ids = False

    def __init__(self, cfg: ModelConfig, every: int | None = None, passes: int = 1) -> None:
        self.name = "retrain"
        self.cfg, self.every, self.passes = cfg, every or RETRAIN_EVERY, passes
        self.items: list[Item] = []
        self.events: list[Interaction] = []
        self.pending = 0
        self.streaming = False
        self.retrains = 0
        self.model = self._fresh()

    def _fresh(self) -> NeuralRecommender:
        model = NeuralRecommender(self.cfg, "retrain", publish_every=None)
        if self.items:
            model.add_items(self.items)
        return model

    def add_items(self, items: Sequence[Item]) -> None:
        """Remembered for every retrain."""
        self.items.extend(items)
        self.model.add_items(items)

    def end_warmup(self) -> None:
        """From now on: buffer, and retrain from scratch every `every` events."""
        self.streaming = True

    def learn(self, batch: Sequence[Interaction]) -> None:
        """Warm-up: learn; stream: buffer, and retrain when `every` events have arrived."""
        self.events.extend(batch)
        if not self.streaming:
            self.model.learn(batch)
            return
        self.pending += len(batch)
        if self.pending >= self.every:
            self.pending = 0
            self.retrains += 1
            self.model = self._fresh()
            for _ in range(self.passes):
                for start in range(0, len(self.events), BATCH_EVENTS):
                    self.model.learn(self.events[start:start + BATCH_EVENTS])

    def rank_batch(self, histories: Sequence[Sequence[str]], k: int,
                   exclude: Sequence[Collection[str]]) -> list[list[str]]:
        """Ranked by the latest retrained model."""
        return self.model.rank_batch(histories, k, exclude)

    def stats(self) -> dict[str, Any]:
        """Extra numbers for quality.json."""
        return {"retrain_every_events": self.every, "retrains": self.retrains}


BASE_CONFIG = ModelConfig()  # what every neural method starts from; `--encoder` replaces it


def neural_factories(base: ModelConfig | None = None) -> dict[str, Any]:
    """name -> factory(catalog, quality_config) for every neural method, from one base config."""
    base = base or BASE_CONFIG

    def make(name: str, **overrides: Any):  # noqa: ANN202
        cfg = replace(base, **overrides)
        return lambda catalog, qcfg: NeuralRecommender(
            replace(cfg, seed=qcfg.seed), name, rate=qcfg.rate,
            publish_interval_s=qcfg.publish_interval_s)

    return {
        "incremental": make("incremental"),
        "incremental-no-replay": make("incremental-no-replay", replay=False),
        "incremental-no-anchor": make("incremental-no-anchor", anchor="none"),
        # the L2-SP anchor to the last publish, at the strength that left HR@10 unchanged
        "incremental-anchor": make("incremental-anchor", anchor="l2sp", anchor_strength=1e-3),
        "incremental-adaptive-lr": make("incremental-adaptive-lr", adaptive_lr=True),
        "incremental-id-only": make("incremental-id-only", text=False, id_embedding=True),
        # the item tower that was the default until issue 8: every version rebuilds the items
        "incremental-mlp": make("incremental-mlp", item_tower="mlp", temperature=0.1,
                                id_lr=1e-2),
        "retrain": lambda catalog, qcfg: Retrain(replace(base, seed=qcfg.seed),
                                                 passes=max(1, qcfg.warmup_passes)),
    }
