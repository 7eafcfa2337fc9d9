"""The trainer consumer: micro-batches (closed by size or by time) -> prequential scoring ->
AdamW steps -> gated publish -> commit. Offsets are committed only after the weights that
include those events are published (at-least-once: a crash replays, never loses)."""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections import deque
from dataclasses import asdict

import redis
import torch
from kafka.structs import TopicPartition
from prometheus_client import start_http_server

from consumers import metrics as transport_metrics
from consumers import trainer_metrics as metrics
from consumers.loop import ConsumerStalled, Polled, Transport
from consumers.settings import TrainerSettings
from model.batching import BatchPolicy, MicroBatcher, publish_due
from model.config import ModelConfig
from model.encoder import TextEncoder
from model.events import Interaction, Item
from model.learner import GateDecision, OnlineLearner
from model.serialization import to_bytes
from protocol.errors import LeaseLost, VerificationError
from protocol.features import FeatureStore, resolve_text_features
from protocol.runtime import freeze_long_lived
from protocol.topics import Source
from protocol.weights import Lease, Manifest, StaleParent, WeightStore

log = logging.getLogger("freshrec.trainer")
PRODUCE_SAMPLE = 32  # produce timestamps per version kept for the freshness histogram
RATE_WINDOW_S = 10.0  # events/s in a published manifest: trained events over this window
EVAL_SCORES = 4_000_000  # the most (event, item) scores one prequential evaluation computes


class Trainer:
    """The logic, apart from the transport: feed it polls, it learns and publishes."""

    def __init__(self, settings: TrainerSettings, learner: OnlineLearner, weights: WeightStore,
                 features: FeatureStore) -> None:
        self.s = settings
        self.learner = learner
        self.weights = weights
        self.features = features
        # events polled but not learned yet: a micro-batch closes by size or by time (the same
        # rule the benchmark simulates), and the learner sizes each step to its share of events
        self.batcher: MicroBatcher[tuple[Source, Interaction]] = MicroBatcher(
            BatchPolicy(settings.batch_max_events, settings.batch_window_ms / 1000))
        self.pending_offsets: dict[TopicPartition, int] = {}  # what learning the batch covers
        self.pending_items: list[Item] = []  # polled items not in the learner yet
        self.trained: dict[TopicPartition, int] = {}  # offsets trained but not yet published
        self.through: dict[str, int] = {}  # every partition's offset covered by published weights
        # offsets of the events learned since the last publish or refusal: "topic:p" -> [first, end)
        self.learned_span: dict[str, list[int]] = {}
        # events the gate refused since the last publish; held uncommitted until a published
        # version records them ("topic:p" -> [first, end))
        self.refused: dict[str, list[int]] = {}
        self.refused_events = 0
        self.refused_reason = ""
        self.unpublished_events = 0
        self.produce_ts: list[float] = []  # produce times of the unpublished events
        self.newest_event_ts = 0.0
        self.behind_s = 0.0  # the newest polled event's age (publish_due stretches on it)
        self.last_publish = 0.0
        self.parent: Manifest | None = None  # the version the learner's weights extend
        self.since_full = 0  # versions since the last full snapshot or checkpoint
        self.full_bytes = 0  # its size, and the deltas' sizes since (see `_full_due`)
        self.delta_bytes = 0
        self.published = 0
        self._last_eval = 0.0
        self._eval_seconds = 0.0  # cost of the last prequential evaluation
        self._rng = random.Random(learner.cfg.seed)  # which events of a batch it ranks
        self.window_hits: deque[float] = deque(maxlen=settings.quality_window)
        self.window_ndcg: deque[float] = deque(maxlen=settings.quality_window)
        self.events_total = 0
        self.rate_marks: deque[tuple[float, int]] = deque()  # (publish time, events_total)
        # the publisher lease: only its holder publishes (one trainer at a time)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease: Lease | None = None
        self._lease_renewed = 0.0
        self._waiting_logged = False

    # ------------------------------------------------------------------ the publisher lease
    def hold_lease(self, now: float) -> bool:
        """Take the publisher lease, or renew it. False while another trainer holds it (then
        do not publish). Raises `LeaseLost` when this trainer held it and it passed on: its
        weights and offsets are stale, it must stop."""
        if self.lease is None:
            self.lease = self.weights.acquire_lease(self.owner, self.s.lease_ttl_ms)
            if self.lease is None:
                if not self._waiting_logged:
                    log.warning("another trainer holds the publisher lease (%s); not publishing",
                                self.weights.lease_holder())
                    self._waiting_logged = True
                return False
            log.info("publisher lease taken: token %s", self.lease.token)
            self._waiting_logged = False
        elif not self.weights.renew_lease(self.lease):
            raise LeaseLost(f"the publisher lease (token {self.lease.token}) passed on to "
                            f"{self.weights.lease_holder()}")
        self._lease_renewed = now
        return True

    def wait_for_lease(self, pause_s: float = 1.0) -> None:
        """Block until this trainer holds the publisher lease (a second trainer waits here)."""
        while not self.hold_lease(time.monotonic()):
            time.sleep(pause_s)

    # ------------------------------------------------------------------ startup
    def bootstrap(self) -> None:
        """Load the catalog from Redis and resume from the newest verified version, if any."""
        items, cursor = self.features.items_since(0)
        while True:  # the whole catalog, page by page
            more, cursor = self.features.items_since(cursor)
            if not more:
                break
            items += more
        latest = self.weights.current()
        if latest is not None:
            try:
                loaded = self.weights.load(latest)
            except VerificationError as exc:
                log.warning("newest version %s does not verify (%s); starting fresh", latest, exc)
            else:
                stored = ModelConfig.from_dict(loaded.manifest.config)
                if stored.architecture() == self.learner.cfg.architecture() and \
                        loaded.manifest.encoder == self.learner.encoder.identity:
                    self.learner.load_tensors(loaded.tensors, loaded.item_ids)
                    self.learner.mark_published()
                    self.parent = loaded.manifest
                    self.full_bytes = sum(4 * t.numel() for t in loaded.tensors.values())
                    # where it resumes: the next manifest still covers partitions not seen since
                    self.through = {str(k): int(v) for k, v in
                                    loaded.manifest.trained_through.get("offsets", {}).items()}
                    log.info("resumed from version %s, trained through %s", latest, self.through)
                else:
                    log.warning("version %s was trained with another architecture; fresh start",
                                latest)
        self.add_items(items, progress=True)

    def resume_offsets(self, topic: str) -> dict[TopicPartition, int]:
        """Where each partition of `topic` starts when assigned: the offsets the published
        weights were trained through. The group's committed offsets only follow them (a commit
        can run ahead of the weights: Redis lost its newest writes, an operator rolled back)."""
        consumed = self._through_partitions()
        # after a rebalance within this process (a step slower than max.poll.interval, a
        # broker restart): what was polled since is in the learner or the batcher already,
        # so it continues after it rather than learning it a second time
        for tp, off in [*self.trained.items(), *self.pending_offsets.items()]:
            consumed[tp] = max(consumed.get(tp, 0), off)
        return {tp: off for tp, off in consumed.items() if tp.topic == topic}

    def _through_partitions(self) -> dict[TopicPartition, int]:
        """`through` ("topic:partition" -> offset) keyed by partition."""
        out = {}
        for key, offset in self.through.items():
            topic, _, partition = key.rpartition(":")
            out[TopicPartition(topic, int(partition))] = offset
        return out

    def add_items(self, items: list[Item], progress: bool = False) -> None:
        if not items:
            return
        feats = resolve_text_features(self.features, self.learner.encoder, items,
                                      progress=progress)
        self.learner.set_text_features(feats, {i.item_id: i.text for i in items})

    # ------------------------------------------------------------------ the loop body
    def on_poll(self, polled: Polled, now: float) -> dict[TopicPartition, int]:
        """Handle one poll. Returns the offsets that may be committed now (maybe none).

        The poll is recorded before anything that can fail (Redis): a caller that retries with
        an empty poll after an error loses nothing, and its offsets are never committed early.
        """
        self.batcher.add(polled.interactions, now)
        self.behind_s = behind(polled, time.time())
        self.pending_offsets.update(polled.offsets)
        self.pending_items.extend(item for _, item in polled.items)
        if polled.interactions and not self.rate_marks:
            self.rate_marks.append((now, 0))  # the rate counts from the first event
        if self.lease is not None and (now - self._lease_renewed) * 3000 >= self.s.lease_ttl_ms:
            self.hold_lease(now)  # also while idle: a lease that lapses passes on
        if self.pending_items:
            self.add_items(self.pending_items)
            self.pending_items = []
        if self.batcher.due(now):
            for batch in self.batcher.take_due(now):
                self.train(batch)
            self._mark_trained()
        elif not len(self.batcher) and self.pending_offsets and not self.unpublished_events \
                and not self.refused:
            # only items or invalid records since the last publish: nothing to wait for
            self.trained.update(self.pending_offsets)
            self.pending_offsets = {}
            done, self.trained = self.trained, {}
            return done
        # A refusal is carried by the next version; when no event comes to make one (the
        # stream went quiet), that version holds the rolled-back weights, only to record it.
        if (self.unpublished_events or self.refused) and publish_due(
                now, self.last_publish, self.s.publish_interval_ms, self.behind_s):
            return self.publish(now)
        return {}

    def _mark_trained(self) -> None:
        """Move the polled offsets the learner now covers to `trained`. A poll can leave a
        micro-batch open (it filled one and began the next, or closed one whose window ran
        out): a partition with events still waiting is covered up to its first waiting one."""
        waiting: dict[TopicPartition, int] = {}
        for src, _ in self.batcher.waiting():
            waiting.setdefault(TopicPartition(src.topic, src.partition), src.offset)
        self.trained.update({tp: waiting.get(tp, off) for tp, off in self.pending_offsets.items()})
        self.pending_offsets = {tp: off for tp, off in self.pending_offsets.items()
                                if tp in waiting}

    def train(self, batch: list[tuple[Source, Interaction]]) -> None:
        events = [e for _, e in batch]
        # Prequential scoring (online HR@10) ranks the whole catalog; on a large catalog that
        # costs more than learning. So it samples batches such that at most a fifth of the
        # time goes to it, and within a batch at most EVAL_SCORES / catalog events, so that
        # one evaluation never stalls the loop (on ML-100K-sized catalogs: every event of
        # every batch; at 100k items 40 events of a batch, at 1M 4).
        t0 = time.monotonic()
        if t0 - self._last_eval >= 4 * self._eval_seconds:
            most = max(1, EVAL_SCORES // max(1, len(self.learner.item_ids)))
            only = None if len(events) <= most else set(self._rng.sample(range(len(events)), most))
            hits, ndcgs = self.learner.evaluate(events, only=only)  # before learning them
            self._last_eval = time.monotonic()
            self._eval_seconds = self._last_eval - t0
            self.window_hits.extend(hits)
            self.window_ndcg.extend(ndcgs)
            metrics.ONLINE_HR.set(sum(self.window_hits) / len(self.window_hits))
            metrics.ONLINE_NDCG.set(sum(self.window_ndcg) / len(self.window_ndcg))
        stats = self.learner.learn(events)
        metrics.EVENTS.inc(stats.events)
        metrics.HELD_OUT.inc(len(events) - stats.events)
        metrics.BATCH.observe(stats.events)
        metrics.STEP.observe(stats.seconds)
        metrics.LOSS.set(stats.loss)
        metrics.LR.set(stats.lr)
        self.unpublished_events += len(events)
        self.events_total += len(events)
        self.newest_event_ts = max(self.newest_event_ts, max(e.ts for e in events))
        self.produce_ts.extend(src.timestamp_ms / 1000.0 for src, _ in batch)
        for src, _ in batch:
            span = self.learned_span.setdefault(f"{src.topic}:{src.partition}",
                                                [src.offset, src.offset + 1])
            span[1] = max(span[1], src.offset + 1)

    def publish(self, now: float) -> dict[TopicPartition, int]:
        """Gate, publish, and hand back the offsets the new version covers."""
        if not self.hold_lease(now):
            return {}  # another trainer publishes; ours stay unpublished and uncommitted
        # nothing learned since the published weights (a version that records a refusal)
        decision = (self.learner.gate() if self.unpublished_events
                    else GateDecision(True, 0.0, 0.0, 0))
        if not decision.publish:
            metrics.GATE_REFUSALS.inc()
            metrics.ROLLBACKS.inc()
            log.warning("gate refused: holdout HR@10 %.3f vs published %.3f; rolled back",
                        decision.hr, decision.reference)
            self.learner.rollback()
            # The refused events are in no weights: commit them only with the next published
            # version, which records them (a crash before it replays and retrains them).
            for key, (first, end) in self.learned_span.items():
                self.refused[key] = [self.refused.get(key, [first])[0], end]
            self.refused_events += self.unpublished_events
            self.refused_reason = (f"gate_refused: holdout HR@10 {decision.hr:.3f} vs published "
                                   f"{decision.reference:.3f} on {decision.events} events")
            self._reset_unpublished(now)
            return {}
        t0 = time.perf_counter()
        kind = "full"
        lost = False  # the parent still goes to `publish`: the new epoch's numbers go on from it
        if self.parent is not None and not self.weights.extends(self.parent):
            lost = True
            log.warning("parent version %s is gone from the store's history (did Redis lose "
                        "data?); publishing a full snapshot under a new epoch",
                        self.parent.version)
        checkpoint = None
        if self.parent is not None and not lost:
            blob = to_bytes(*self.learner.published_delta())  # costs what changed
            kind = "delta"
            if self._full_due():  # for readers without the parent; followers read the delta
                checkpoint = to_bytes(self.learner.state_tensors(), self.learner.item_ids)
        else:
            blob = to_bytes(self.learner.state_tensors(), self.learner.item_ids)
        step = max(1, len(self.produce_ts) // PRODUCE_SAMPLE)
        self.through.update({f"{tp.topic}:{tp.partition}": off for tp, off in self.trained.items()})
        through = {
            "offsets": dict(self.through),
            "newest_event_ts": self.newest_event_ts,
            "produced_ts": sorted(self.produce_ts)[::step][:PRODUCE_SAMPLE],
            "events": self.unpublished_events,
            "holdout_hr@10": decision.hr if decision.events else None,  # None: no verdict
            "lease_token": self.lease.token if self.lease else None,
            **self._live_numbers(now),
        }
        if self.refused:  # offsets covered, events not learned: the gate refused them
            through["refused"] = dict(self.refused)
            through["refused_events"] = self.refused_events
            through["refused_reason"] = self.refused_reason
        publish_as = dict(config=asdict(self.learner.cfg), encoder=self.learner.encoder.identity,
                          trained_through=through, lease=self.lease)
        try:
            manifest = self.weights.publish(
                blob, parent=self.parent, kind=kind, checkpoint=checkpoint, **publish_as)
        except StaleParent:  # Redis lost the parent since `extends` looked (a flush just now)
            log.warning("parent version %s vanished while publishing (did Redis lose data?); "
                        "publishing a full snapshot under a new epoch", self.parent.version
                        if self.parent else None)
            kind = "full"
            blob = to_bytes(self.learner.state_tensors(), self.learner.item_ids)
            manifest = self.weights.publish(blob, parent=self.parent, kind=kind, **publish_as)
        self.learner.mark_published()
        self.parent = manifest
        if kind == "full" or manifest.checkpoint:
            size = len(blob) if kind == "full" else len(checkpoint or b"")
            self.since_full, self.full_bytes, self.delta_bytes = 0, size, 0
        else:
            self.since_full, self.delta_bytes = self.since_full + 1, self.delta_bytes + len(blob)
        self.published += 1
        metrics.PUBLISHED.inc()
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - t0)
        metrics.PUBLISH_BYTES.observe(len(blob))
        self._reset_unpublished(now)
        self.refused, self.refused_events = {}, 0
        if self.s.crash_after_publish and self.published >= self.s.crash_after_publish:
            log.error("fault injection: exiting after publish %s, before commit", manifest.version)
            os._exit(3)
        self.trained = {}
        # The group's commits follow the weights on every partition they cover, also those
        # that brought nothing new since a restart (resumed past a commit lost in a crash).
        return self._through_partitions()

    def _full_due(self) -> bool:
        """A checkpoint (the whole state, beside the delta) every `full_every` versions at the
        most, and only once the deltas since the last one add up to its size: a server joining
        late then reads at most about two snapshots' bytes, and on a large catalog (1M items: a
        270 MB snapshot, 1 MB deltas) the trainer writes one every few hundred versions, not
        every few seconds. Servers following the chain never read it."""
        return self.since_full + 1 >= self.s.full_every and self.delta_bytes >= self.full_bytes

    def _live_numbers(self, now: float) -> dict[str, float | None]:
        """What the API's status page shows of the trainer (it cannot scrape this process):
        the online window's quality, the recent training rate, and records set aside."""
        marks = self.rate_marks
        marks.append((now, self.events_total))
        while len(marks) > 2 and marks[1][0] <= now - RATE_WINDOW_S:
            marks.popleft()  # keep one mark at or before the window's start as the anchor
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        hits, ndcg = self.window_hits, self.window_ndcg
        return {
            "online_hr@10": sum(hits) / len(hits) if hits else None,
            "online_ndcg@10": sum(ndcg) / len(ndcg) if ndcg else None,
            "events_per_s": (n1 - n0) / (t1 - t0) if t1 > t0 else None,
            "dlq": int(sum(s.value for m in transport_metrics.DLQ.collect() for s in m.samples
                           if s.name.endswith("_total"))),
        }

    def _reset_unpublished(self, now: float) -> None:
        self.unpublished_events = 0
        self.learned_span = {}
        self.produce_ts = []
        self.last_publish = now


def behind(polled: Polled, now: float) -> float:
    """Seconds since the newest interaction of `polled` was produced (its Kafka timestamp; `now`
    is the wall clock): how far behind the stream the trainer reads. 0 for an empty poll (it
    caught up) or records without a timestamp. Producer and trainer clocks are assumed in
    step, as for the freshness metric."""
    newest = max((src.timestamp_ms for src, _ in polled.interactions), default=0)
    return max(0.0, now - newest / 1000) if newest > 0 else 0.0


def build_encoder(settings: TrainerSettings) -> TextEncoder:
    """The trainer's text encoder (`freshrec up` builds the same one to pre-encode a catalog)."""
    cfg = ModelConfig(encoder_path=settings.encoder_path, policy=settings.policy)
    return TextEncoder(cfg.encoder_path, cfg.max_text_tokens, cfg.policy, cfg.lora_rank)


def build_learner(settings: TrainerSettings) -> OnlineLearner:
    cfg = ModelConfig(encoder_path=settings.encoder_path, policy=settings.policy,
                      item_tower=settings.item_tower)
    return OnlineLearner(cfg, build_encoder(settings), device=settings.device)


def run(settings: TrainerSettings) -> None:
    """Wire Kafka, Redis and the learner together and loop until SIGTERM.

    When the publisher lease passes on (an operator rolled back, or another trainer took over
    after this one stalled), whatever this trainer learned since its last publish is stale:
    it starts over in-process from the version the pointer names, and from the offsets stored
    with it, as a freshly started trainer would (waiting for the lease first)."""
    key = settings.require_hmac_key()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.trainer_metrics_port:
        start_http_server(settings.trainer_metrics_port, addr="0.0.0.0")
    client = settings.redis_client()  # every call times out: a paused Redis cannot hang us
    while True:
        trainer = Trainer(settings, build_learner(settings),
                          WeightStore(client, key, settings.namespace, settings.keep_versions),
                          FeatureStore(client, settings.namespace))
        try:
            if not serve(settings, trainer):
                return
        except (LeaseLost, ConsumerStalled) as exc:  # a stalled consumer: a fresh one
            log.warning("%s; starting over from the current version (nothing unpublished was "
                        "committed)", exc)


def serve(settings: TrainerSettings, trainer: Trainer) -> bool:
    """One life of a trainer: lease, resume, then poll, learn, publish, commit until stopped
    (returns False) or until the lease is lost (raises `LeaseLost`)."""
    trainer.wait_for_lease()  # before resuming: the version to resume from is then final
    trainer.bootstrap()
    freeze_long_lived("loading the model and the catalog")
    transport = Transport(settings, settings.trainer_group, "trainer", dlq=False,
                          max_records=settings.batch_max_events,
                          positions=lambda: trainer.resume_offsets(settings.topic_interactions))
    transport.install_signal_handlers()
    log.info("trainer up (group %s, device %s)", settings.trainer_group, trainer.learner.device)
    try:
        for polled in transport.batches(timeout_ms=20):
            while True:
                try:
                    done = trainer.on_poll(polled, time.monotonic())
                    break
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    log.warning("redis unavailable (%s); retrying the publish", exc)
                    polled = Polled()
                    if not transport.running:
                        return False
                    time.sleep(0.5)
            transport.commit(done)
        return False
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # while starting over: stop at once
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        transport.close()
        if trainer.lease is not None:
            try:
                trainer.weights.release_lease(trainer.lease)
            except redis.exceptions.RedisError:
                pass  # it lapses by itself


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(TrainerSettings())


if __name__ == "__main__":
    main()
