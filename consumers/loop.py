"""The transport: poll, decode, part good from bad, DLQ, lag, commit. Knows nothing of models.

Both consumers subscribe to the interactions and items topics in their own consumer group and
hand lists of decoded records to a plain handler.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import MemberState, OffsetAndMetadata, TopicPartition

from consumers import metrics
from consumers.group import group_members
from consumers.joins import keep_finished_joins
from model.events import Interaction, Item
from protocol.errors import InvalidRecord
from protocol.settings import CommonSettings
from protocol.topics import Source, decode_interaction, decode_item, ensure_topics

log = logging.getLogger(__name__)
DLQ_WAIT_S = 10.0  # the longest a poll waits for its DLQ writes (their delivery timeout is 5 s)
DLQ_RETRY_S = 1.0  # pause before a poll whose DLQ writes failed is fetched again
# An assigned partition that stays behind its log end this long without a record is stalled.
# kafka-python 3.0.x can leave a partition unfetchable after a rebalance (dpkp/kafka-python
# #3106, #3131): polls return nothing while the lag grows, for good. Measured in the chaos
# run: a trainer restarted by a kill -9 published nothing for minutes with 20,000 events
# waiting. First remedy: seek the partition to its own position and resume it (both reset the
# client's fetch state; nothing is skipped or read twice). If it is still stalled after
# another STALL_S, the process exits (ConsumerStalled): its supervisor restarts it and the
# restart rejoins the group, resuming from committed (trainer: published) offsets.
STALL_S = 15.0
# A subscribed consumer that holds no partition and is not a settled member of its group this
# long after the broker first answered its JoinGroup is stuck outside the group. The embedded
# Tansu 0.6.0 leaves a group so when its leader leaves cleanly while the group is forming (a
# consumer stopped during its own first ~3 s join, one process at a time, as the chaos run's
# SIGTERMs did; or a rolling restart's old member leaving after the new one joined): it drops
# the member but keeps its id as the group's leader, so every other member's SyncGroup answers
# "rebalance in progress", forever (`python -m bench.tansu_group`).
# kafka-python's polls still return on time (measured: at most 0.14 s for timeout_ms=100
# during 60 s stuck), with nothing, so the stall check above, which watches assigned
# partitions, sees nothing. Measured 2026-11-30 on Tansu 0.6.0 / kafka-python 3.0.12: a fresh
# consumer (a new member id) stays outside too, in the same process (4 tries in 60 s) or in a
# new one (30 s); a fresh consumer that joins under the departed leader's member id (the
# broker names it in every JoinGroup answer; DescribeGroups no longer lists it) is assigned
# 3.0 s later. So the first remedy is that rejoin (as a new member when the named leader is
# still in the group: a live member is never impersonated); if the consumer is still outside
# another UNASSIGNED_S later, it raises ConsumerStalled (the trainer starts over in-process,
# the features consumer exits to be restarted). A member of a settled group that got no
# partition (more members than partitions) is not stuck, nor is one whose broker does not
# answer (the clock waits for it). A healthy overlap of two live members settles in ~5 s on
# Tansu here (11-14 s, at times over 40 s, while kafka-python threw away joins that finished
# between polls: consumers/joins.py); Apache Kafka ends a rebalance within
# max_poll_interval_ms (10 s).
UNASSIGNED_S = 30.0
# How long the broker may take to answer a fetch (Kafka's default; it answers as soon as it has
# a record, so this adds no latency at the log end: measured 6 ms p50 either way on Tansu).
# It was 50 ms. The embedded Tansu 0.6.0 (in-memory storage) takes longer to answer a fetch
# the more batches the partition holds, and when that is longer than the fetch's max wait it
# answers with nothing, every time: at 30,000 one-record batches in a partition (the chaos
# producer's 100 events/s are ~1 record per batch) a 10 ms consumer read nothing in 10 s
# (200,000 records in 2,000 batches: no such effect), and past ~60,000 the 50 ms consumers
# read nothing either. The full chaos run of 2026-11-30 09:00
# UTC had both consumers "stalled" on that (STALL_S resets and restarts every 15-40 s, the
# trainer's kill recoveries 4 minutes each); a fresh consumer with 50 ms read 0 of 20,000
# records in 30 s there, with 100 ms 2,800, with 250 or 500 ms all of them.
FETCH_MAX_WAIT_MS = 500


class ConsumerStalled(RuntimeError):
    """Polls return nothing while an assigned partition is behind its log end, even after the
    transport reset its fetch state, or the consumer stays outside its group even after
    rejoining it: the process should exit and be restarted."""


@dataclass
class Polled:
    """One poll's worth of records, parted into good and bad, with the offsets they reach."""

    interactions: list[tuple[Source, Interaction]] = field(default_factory=list)
    items: list[tuple[Source, Item]] = field(default_factory=list)
    errors: list[tuple[Source, bytes | None, bytes | None, InvalidRecord]] = field(
        default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset per partition

    def __bool__(self) -> bool:
        return bool(self.offsets)


Positions = Callable[[], Mapping[TopicPartition, int]]


class _SeekOnAssignment(ConsumerRebalanceListener):
    """Starts each newly assigned partition at the offset `positions` names for it, if any;
    the others start at the group's committed offset (or the earliest one)."""

    def __init__(self, consumer: KafkaConsumer, positions: Positions) -> None:
        self.consumer = consumer
        self.positions = positions

    def on_partitions_revoked(self, revoked: object) -> None:
        pass

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        wanted = self.positions()
        for tp in assigned:
            if tp in wanted:
                log.info("%s:%s starts at offset %s", tp.topic, tp.partition, wanted[tp])
                self.consumer.seek(tp, wanted[tp])


class Transport:
    """A Kafka consumer (manual commits) plus an optional DLQ producer.

    `positions`, when given, is asked at every partition assignment where each partition
    starts; it overrides the group's committed offsets (the trainer resumes from the offsets
    its weights were trained through, which the committed ones only follow)."""

    def __init__(self, settings: CommonSettings, group: str, name: str, dlq: bool,
                 max_records: int = 2048, positions: Positions | None = None) -> None:
        self.s = settings
        self.group = group
        self.name = name
        self.max_records = max_records
        self.positions = positions
        ensure_topics(settings.kafka_bootstrap, [settings.topic_interactions, settings.topic_items,
                                                 settings.topic_dlq], settings.partitions)
        # Written by kafka-python's IO thread, read by the polling one (see _note_join).
        self._join_answered_at: float | None = None  # first JoinGroup answer of this spell
        self._group_leader: tuple[str, str] | None = None  # (leader, this member) last answered
        self.consumer = self._consumer()
        self.dlq = dlq
        self.producer: KafkaProducer | None = self._dlq_producer() if dlq else None
        self.running = True
        self._last_lag = 0.0
        self.stall_s = STALL_S
        self._progress_at = time.monotonic()  # last poll with records, or with nothing to fetch
        self._reset_at = float("-inf")  # last time a stall was met by resetting the fetch state
        self._assigned: frozenset[TopicPartition] = frozenset()
        self.unassigned_s = UNASSIGNED_S
        self._outside_at: float | None = None  # since when outside the group (no partition)
        self._rejoined = False  # this spell outside was met by rejoining the group

    def _consumer(self, member_id: str | None = None) -> KafkaConsumer:
        """A subscribed consumer; `member_id`: join the group under this id (see UNASSIGNED_S)."""
        # Short group timeouts: a consumer group's first join otherwise waits ~20 s on Tansu.
        consumer = KafkaConsumer(
            bootstrap_servers=self.s.kafka_bootstrap, group_id=self.group, client_id=self.name,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_interval_ms=10_000, session_timeout_ms=6_000, heartbeat_interval_ms=1_500,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        keep_finished_joins(consumer)  # a join that finished between two polls still counts
        coordinator = consumer._coordinator  # noqa: SLF001 - see _note_join
        process = coordinator._process_join_group_response  # noqa: SLF001

        def noted(response: object, send_time: float) -> object:
            out = process(response, send_time)  # raises on an error answer
            self._note_join(response)
            return out

        coordinator._process_join_group_response = noted  # noqa: SLF001
        if member_id is not None:
            coordinator.reset_generation(member_id=member_id)  # the next JoinGroup carries it
        topics = [self.s.topic_interactions, self.s.topic_items]
        if self.positions is None:
            consumer.subscribe(topics)
        else:
            consumer.subscribe(topics, listener=_SeekOnAssignment(consumer, self.positions))
        return consumer

    def _note_join(self, response: object) -> None:
        """Called by kafka-python (its IO thread) for every JoinGroup answered without error;
        kafka-python keeps neither the time nor the leader the broker named. Only plain
        attributes are set here: the polling thread acts on them."""
        if self._join_answered_at is None:
            self._join_answered_at = time.monotonic()
        self._group_leader = (response.leader, response.member_id)  # type: ignore[attr-defined]

    def _dlq_producer(self) -> KafkaProducer:
        # Delivery is bounded below DLQ_WAIT_S, so every DLQ write has an outcome to check.
        return KafkaProducer(bootstrap_servers=self.s.kafka_bootstrap, linger_ms=5, acks="all",
                             max_block_ms=4_000, request_timeout_ms=4_000,
                             delivery_timeout_ms=5_000)

    def stop(self, *_: object) -> None:
        self.running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def poll(self, timeout_ms: int) -> Polled:
        """Poll once and decode. Bad records never raise: they land in `errors` (and the DLQ)."""
        out = Polled()
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.max_records)
        self._watch_for_stall(any(batches.values()))
        self._watch_for_assignment()
        for tp, records in batches.items():
            metrics.RECORDS.labels(self.name, tp.topic).inc(len(records))
            for rec in records:
                src = Source(tp.topic, tp.partition, rec.offset, rec.timestamp)
                try:
                    if tp.topic == self.s.topic_items:
                        out.items.append((src, decode_item(rec.value)))
                    else:
                        out.interactions.append((src, decode_interaction(rec.value)))
                except InvalidRecord as err:
                    out.errors.append((src, rec.key, rec.value, err))
                out.offsets[tp] = rec.offset + 1
        if out.errors and self.dlq and not self._dead_letter(out.errors):
            # Nothing of this poll may be committed: fetch it again and retry the DLQ.
            for tp, records in batches.items():
                if records:
                    self.consumer.seek(tp, records[0].offset)
            time.sleep(DLQ_RETRY_S)
            return Polled()
        for _, _, _, invalid in out.errors:
            metrics.DLQ.labels(self.name, invalid.reason).inc()
        self._update_lag()
        return out

    def _dead_letter(self, errors: list[tuple[Source, bytes | None, bytes | None,
                                              InvalidRecord]]) -> bool:
        """Write the bad records to the DLQ and wait until each one is acknowledged. False if
        any write failed: then the caller must not commit past them."""
        try:
            if self.producer is None:  # dropped after a failed write
                self.producer = self._dlq_producer()
            futures = []
            for src, key, value, err in errors:
                headers = [("source_topic", src.topic.encode()),
                           ("source_partition", str(src.partition).encode()),
                           ("source_offset", str(src.offset).encode()),
                           ("error", str(err).encode()[:1024]),
                           ("error_reason", err.reason.encode())]
                futures.append(self.producer.send(self.s.topic_dlq, key=key, value=value,
                                                  headers=headers))
            self.producer.flush(timeout=DLQ_WAIT_S)
            for f in futures:
                f.get(timeout=0)  # raises the write's own error
        except KafkaError as exc:
            metrics.DLQ_FAILURES.labels(self.name).inc()
            log.error("DLQ write failed (%s); the poll will be fetched again, nothing committed",
                      exc)
            # A fresh producer for the retry: one whose broker restarted can stay failed for
            # good (the broker forgot its idempotent producer id).
            old, self.producer = self.producer, None
            if old is not None:
                try:
                    old.close(timeout=0)
                except KafkaError:
                    pass
            return False
        return True

    def _watch_for_stall(self, got_records: bool) -> None:
        """Notice a partition that fetches nothing while its log grows (see STALL_S)."""
        now = time.monotonic()
        assigned = frozenset(self.consumer.assignment())
        if got_records or assigned != self._assigned:  # a (re)join starts the clock again
            self._progress_at, self._assigned = now, assigned
            return
        if now - self._progress_at < self.stall_s:
            return
        behind = self._behind()
        if not behind:  # idle: nothing to fetch
            self._progress_at = now
            return
        where = ", ".join(f"{tp.topic}:{tp.partition} at {pos} of {end}"
                          for tp, (pos, end) in sorted(behind.items()))
        metrics.STALLS.labels(self.name).inc()
        if self._reset_at < self._progress_at:
            log.warning("no record for %.0f s while behind the log end (%s): resetting the "
                        "fetch state of those partitions", now - self._progress_at, where)
            self._reset_fetch(behind)
            self._reset_at = self._progress_at = now
            return
        raise ConsumerStalled(f"{self.name}: still no record {now - self._reset_at:.0f} s after "
                              f"resetting the fetch state ({where}); exiting to be restarted")

    def _watch_for_assignment(self) -> None:
        """Notice a consumer the group never lets in (see UNASSIGNED_S)."""
        if self.consumer.assignment() or self.consumer.group_metadata().state == MemberState.STABLE:
            self._outside_at, self._rejoined, self._join_answered_at = None, False, None
            return
        now = time.monotonic()
        if self._outside_at is None:  # the clock starts at the broker's first JoinGroup answer
            if self._join_answered_at is None:
                return
            self._outside_at = now
        if now - self._outside_at < self.unassigned_s:
            return
        if not self._rejoined:
            metrics.UNASSIGNED.labels(self.name, "rejoin").inc()
            self._rejoin()
            self._outside_at, self._rejoined = None, True
            return
        metrics.UNASSIGNED.labels(self.name, "exit").inc()
        raise ConsumerStalled(f"{self.name}: still no partition {now - self._outside_at:.0f} s "
                              f"after rejoining group {self.group}; exiting to be restarted")

    def _rejoin(self) -> None:
        """Close the consumer and join again with a fresh one: under the member id the broker
        names as the group's leader when that member is gone from the group (Tansu's stale
        leader, see UNASSIGNED_S), else under a new member id."""
        leader, me = self._group_leader or ("", "")
        adopt = None
        if leader and leader != me:
            members = group_members(self.s.kafka_bootstrap, self.group)
            if members is not None and leader not in members:
                adopt = leader
        log.warning("no partition for %.0f s: the group %s does not settle (leader %s, this "
                    "member %s); rejoining %s", self.unassigned_s, self.group, leader or "?",
                    me or "?", f"as the departed leader {adopt}" if adopt else "as a new member")
        try:
            self.consumer.close(autocommit=False, timeout_ms=5_000)
        except KafkaError as exc:
            log.warning("closing the consumer: %s", exc)
        self._join_answered_at, self._group_leader = None, None
        try:
            self.consumer = self._consumer(adopt)
        except KafkaError as exc:  # the broker went away meanwhile: start over from scratch
            raise ConsumerStalled(f"{self.name}: cannot rejoin group {self.group} ({exc})"
                                  ) from exc

    def _behind(self) -> dict[TopicPartition, tuple[int, int]]:
        """Assigned partitions whose position is short of the log end: {tp: (position, end)}."""
        assigned = list(self.consumer.assignment())
        if not assigned:
            return {}
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=2_000)
            positions = {tp: self.consumer.position(tp, timeout_ms=2_000) for tp in assigned}
        except KafkaError as exc:
            log.warning("stall check skipped: %s", exc)  # the broker is down: not a stall
            return {}
        return {tp: (positions[tp], ends[tp]) for tp in assigned
                if positions.get(tp) is not None and ends.get(tp) is not None
                and positions[tp] < ends[tp]}

    def _reset_fetch(self, behind: Mapping[TopicPartition, tuple[int, int]]) -> None:
        self.consumer.resume(*behind)  # freshrec never pauses a partition itself
        for tp, (pos, _) in behind.items():
            self.consumer.seek(tp, pos)

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < 1.0:
            return
        self._last_lag = now
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                pos = self.consumer.position(tp, timeout_ms=100)
            except Exception:  # noqa: BLE001 - lag is best effort, never fatal
                continue
            lag = max(0, high - (pos or 0))  # Tansu's end offsets can trail: clamp
            metrics.LAG.labels(self.name, tp.topic, str(tp.partition)).set(lag)

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit; after a rebalance, or while the broker is away, the commit fails and the
        records come again unless a later commit covers them (at-least-once)."""
        if not offsets:
            return True
        try:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1)
                                  for tp, off in offsets.items()})
        except KafkaError as exc:  # CommitFailedError, or the coordinator unreachable
            log.warning("commit failed (%s); records will be redelivered", exc)
            return False
        return True

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            if self.producer is not None:
                self.producer.close(timeout=5)

    def batches(self, timeout_ms: int) -> Iterator[Polled]:
        """Poll until stopped; yields every poll, empty ones included (for time windows)."""
        while self.running:
            yield self.poll(timeout_ms)
