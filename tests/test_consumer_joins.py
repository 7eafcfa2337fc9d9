"""A group join that finishes while the consumer is busy between polls is not lost.

kafka-python 3.0.12 throws away a JoinGroup -> SyncGroup round that finished while no poll was
waiting for it and sends a new JoinGroup, which Tansu answers ~3 s later: again between polls
for a consumer that is busy at the wrong moment, so it never joins (consumers/joins.py). Here
the busy spell outlasts Tansu's answer every time, so without the fix the transport is never
assigned; with it, the first poll after the answer completes the join.
"""

from __future__ import annotations

import time

import pytest

from consumers.loop import Transport
from consumers.settings import FeaturesSettings

pytestmark = pytest.mark.integration

BUSY_S = 4.5  # between polls: longer than Tansu's ~3 s JoinGroup answer, within the 6-s session


def test_a_join_that_finishes_between_polls_completes_at_the_next_poll(kafka_bootstrap: str,
                                                                       namespace: str) -> None:
    s = FeaturesSettings(kafka_bootstrap=kafka_bootstrap, topic_interactions=f"{namespace}.i",
                         topic_items=f"{namespace}.it", topic_dlq=f"{namespace}.dlq",
                         partitions=1, features_group=f"{namespace}-features")
    transport = Transport(s, s.features_group, "features", dlq=False)
    try:
        # The first poll sends the JoinGroup, the second finds it answered; a third in case the
        # broker answers late on a loaded machine.
        for _ in range(3):
            transport.poll(100)
            if transport.consumer.assignment():
                break
            time.sleep(BUSY_S)  # the handler's work
        else:
            pytest.fail(f"not assigned after 3 polls {BUSY_S} s apart")
    finally:
        transport.close()
