"""A group join that finishes between two polls is kept, not thrown away and sent again.

kafka-python 3.0.12 runs a JoinGroup -> SyncGroup round as a task on its IO thread, but only a
poll that is waiting for that task when it finishes takes its assignment (`join_group_async`);
a poll that comes after it finished sees a finished task and starts a new round, with a new
JoinGroup. Tansu answers a JoinGroup after ~3 s (its initial rebalance delay), so a consumer
whose polls leave gaps keeps throwing away finished joins. Measured 2026-11-30 on Tansu 0.6.0,
one member alone in a new group, `poll(200)` in a loop: assigned after 3.3 s (2 JoinGroups)
with no pause between polls, 13-45 s (5-16 JoinGroups) with 0.2 s between them, whatever the
fetch wait; once long enough for the transport to take it for Tansu's stale leader and rejoin,
then exit (consumers.loop.UNASSIGNED_S). A gap is anything done between polls: a handler, a
commit, a test's sleep, another consumer's poll. Each lost join of a member in a group of two
also starts the other member's rebalance again.

`keep_finished_joins` makes the next round hand back the unclaimed assignment at once, so the
waiting poll completes the join as if it had been waiting all along. It is kept only while it
can still be current: same generation and member, and younger than the session timeout (after
that the broker has dropped the member, which never heartbeats before its join completes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import kafka
from kafka import KafkaConsumer

log = logging.getLogger(__name__)


@dataclass
class _Finished:
    """A JoinGroup -> SyncGroup round that ended well."""

    generation: object  # the coordinator's Generation it ended with
    assignment: bytes
    at: float = field(default_factory=time.monotonic)


def keep_finished_joins(consumer: KafkaConsumer) -> None:
    """Patch `consumer`'s group coordinator (kafka-python 3.0.12 internals) as described above."""
    coordinator = consumer._coordinator  # noqa: SLF001
    if not all(hasattr(coordinator, name) for name in
               ("_do_join_and_sync_async", "_on_join_complete_async", "_generation")):
        log.warning("this kafka-python (%s) has no join internals to patch; a join that "
                    "finishes between polls may be sent again", kafka.__version__)
        return
    join_and_sync: Callable[[], Awaitable[bytes]] = coordinator._do_join_and_sync_async  # noqa: SLF001
    complete = coordinator._on_join_complete_async  # noqa: SLF001
    session_s = coordinator.config["session_timeout_ms"] / 1000
    unclaimed: _Finished | None = None

    async def join_and_sync_once() -> bytes:
        """One JoinGroup -> SyncGroup round, or the finished one no poll has claimed yet."""
        nonlocal unclaimed
        finished, unclaimed = unclaimed, None
        if (finished is not None and finished.generation is coordinator._generation  # noqa: SLF001
                and time.monotonic() - finished.at < session_s):
            return finished.assignment
        assignment = await join_and_sync()
        unclaimed = _Finished(coordinator._generation, assignment)  # noqa: SLF001
        return assignment

    async def claimed(*args: object) -> object:
        nonlocal unclaimed
        unclaimed = None  # a poll took this round's assignment
        return await complete(*args)

    coordinator._do_join_and_sync_async = join_and_sync_once  # noqa: SLF001
    coordinator._on_join_complete_async = claimed  # noqa: SLF001
