"""A consumer its group never lets in is noticed and let in (or ends, to be restarted).

The chaos run found the features consumer outside its group for 15 minutes after a rolling
restart: on the embedded Tansu 0.6.0, when a group's leader leaves cleanly while a new member is
joining, the broker keeps the departed member as the group's leader, and every other member's
SyncGroup answers "rebalance in progress", forever (`python -m bench.tansu_group`). Polls return
on time with nothing and no partition is assigned, so the stall check never looks. Here the
same overlap is made against the real broker: member A is in the group, the transport joins,
A leaves cleanly; or, one member at a time, A is stopped cleanly while it is still joining
(the chaos run's case: its SIGTERMs came 0.2-2.5 s after a restart). The transport must rejoin
and read what is produced afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import MemberState
from prometheus_client import REGISTRY

from consumers.joins import keep_finished_joins
from consumers.loop import ConsumerStalled, Transport
from consumers.settings import FeaturesSettings
from protocol.topics import ensure_topics

pytestmark = pytest.mark.integration

UNASSIGNED_S = 3.0  # the transport's bound here (30 s in production)


def _settings(kafka_bootstrap: str, namespace: str) -> FeaturesSettings:
    return FeaturesSettings(kafka_bootstrap=kafka_bootstrap, topic_interactions=f"{namespace}.i",
                            topic_items=f"{namespace}.it", topic_dlq=f"{namespace}.dlq",
                            partitions=1, features_group=f"{namespace}-features")


def _member(s: FeaturesSettings, client_id: str) -> KafkaConsumer:
    """Another member of the transport's group, as a second features process would be."""
    c = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=s.features_group,
                      client_id=client_id, enable_auto_commit=False,
                      auto_offset_reset="earliest", max_poll_interval_ms=10_000,
                      session_timeout_ms=6_000, heartbeat_interval_ms=1_500)
    keep_finished_joins(c)  # as the transport does
    c.subscribe([s.topic_interactions, s.topic_items])
    return c


def _transport(s: FeaturesSettings, cls: type[Transport] = Transport) -> Transport:
    transport = cls(s, s.features_group, "features", dlq=False)
    transport.unassigned_s = UNASSIGNED_S
    return transport


def _until(what: str, step, done, seconds: float) -> float:  # noqa: ANN001
    """Call step() until done() holds; the seconds it took. Fails after `seconds`."""
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > seconds:
            pytest.fail(f"{what}: not within {seconds:.0f} s")
        step()
    return time.monotonic() - t0


def _counted(remedy: str) -> float:
    return REGISTRY.get_sample_value("freshrec_consumer_unassigned_total",
                                     {"consumer": "features", "remedy": remedy}) or 0.0


def _overlap(s: FeaturesSettings, transport: Transport) -> None:
    """A in the group; the transport joins (the group forms again under A); A leaves cleanly
    (a rolling restart)."""
    a = _member(s, "a-member")
    _until("member A assigned", lambda: a.poll(100), a.assignment, 30)
    _until("the broker answering the transport's JoinGroup", lambda: transport.poll(100),
           lambda: transport.consumer.group_metadata().generation_id >= 0, 30)
    a.close(autocommit=False)  # a LeaveGroup while the group forms: Tansu keeps A as leader


def _stopped_while_joining(s: FeaturesSettings, transport: Transport) -> None:
    """One member at a time: A is stopped (cleanly) during its own first join, before the
    transport polls at all (the chaos run's SIGTERMs, 0.2-2.5 s after a restart)."""
    a = _member(s, "a-member")
    a.poll(100)  # sends JoinGroup; close() waits for its answer, then leaves the forming group
    a.close(autocommit=False)


Stuck = Callable[[FeaturesSettings, Transport], None]


@pytest.mark.parametrize("stuck", [_overlap, _stopped_while_joining])
def test_a_consumer_left_outside_its_group_rejoins_and_reads(kafka_bootstrap: str,
                                                             namespace: str, stuck: Stuck) -> None:
    s = _settings(kafka_bootstrap, namespace)
    rejoins, exits = _counted("rejoin"), _counted("exit")
    transport = _transport(s)
    try:
        stuck(s, transport)
        took = _until("the transport assigned after A left", lambda: transport.poll(100),
                      lambda: transport.consumer.assignment(), 3 * UNASSIGNED_S + 15)
        assert _counted("rejoin") - rejoins == 1 and _counted("exit") == exits
        prod = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        for i in range(5):
            prod.send(s.topic_interactions, key=b"u1", value=json.dumps(
                {"user_id": "u1", "item_id": f"i{i}", "ts": i}).encode())
        prod.flush()
        prod.close()
        got: list[str] = []
        _until("the 5 records produced after the rejoin",
               lambda: got.extend(i.item_id for _, i in transport.poll(100).interactions),
               lambda: len(got) >= 5, 20)
        assert got == [f"i{i}" for i in range(5)]
        print(f"assigned {took:.1f} s after A left")  # noqa: T201 - shown with -s
    finally:
        transport.close()


class _RejoinsAsNewMember(Transport):
    """A rejoin that does not cure Tansu's stale leader (a new member id): must end loudly."""

    def _rejoin(self) -> None:
        self._group_leader = None
        super()._rejoin()


def test_a_consumer_still_outside_after_rejoining_ends(kafka_bootstrap: str,
                                                       namespace: str) -> None:
    s = _settings(kafka_bootstrap, namespace)
    exits = _counted("exit")
    transport = _transport(s, _RejoinsAsNewMember)
    try:
        _overlap(s, transport)
        with pytest.raises(ConsumerStalled, match="still no partition"):
            deadline = time.monotonic() + 3 * UNASSIGNED_S + 20
            while time.monotonic() < deadline:
                transport.poll(100)
        assert _counted("exit") - exits == 1
    finally:
        transport.close()


def test_a_settled_member_without_partitions_is_left_alone(kafka_bootstrap: str,
                                                           namespace: str) -> None:
    """More members than partitions: the one without any is in the group, not stuck."""
    s = _settings(kafka_bootstrap, namespace)
    rejoins = _counted("rejoin")
    a = _member(s, "a-member")  # sorts before "features-...": the range assignor gives A all
    # A settles alone first, then the transport joins (a rolling join). These polls alternate,
    # so each member's join often finished during the other's poll: before consumers/joins.py
    # kept such joins, the group took 11 to over 90 s to settle on Tansu; now ~5 s
    ensure_topics(s.kafka_bootstrap, [s.topic_interactions, s.topic_items, s.topic_dlq],
                  s.partitions)  # one partition each, before A's subscription creates them
    _until("the first member settled", lambda: a.poll(50), lambda: bool(a.assignment()), 40)
    transport = _transport(s)
    transport.unassigned_s = 120.0  # no remedy while the group settles
    first = transport.consumer
    try:
        def both() -> None:
            a.poll(50)
            transport.poll(50)

        _until("both members settled", both,
               lambda: a.assignment() and transport.consumer.group_metadata().state
               == MemberState.STABLE, 90)
        transport.unassigned_s = UNASSIGNED_S
        end = time.monotonic() + 3 * UNASSIGNED_S
        while time.monotonic() < end:
            both()
        assert not transport.consumer.assignment(), "the test needs the transport without any"
        assert transport.consumer is first and _counted("rejoin") == rejoins
    finally:
        a.close(autocommit=False)
        transport.close()
