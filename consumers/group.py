"""What the broker says of a consumer group: its members (DescribeGroups).

The transport asks before it rejoins a group under the member id the broker names as the
group's leader (consumers/loop.py, UNASSIGNED_S): only a leader that is no longer a member (the
stale leader the embedded Tansu 0.6.0 keeps) may be taken over; a live one never is.
"""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.protocol.admin import DescribeGroupsRequest

log = logging.getLogger(__name__)


def group_members(bootstrap: str, group: str) -> set[str] | None:
    """Member ids of `group` on its coordinator; None when the broker cannot be asked."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=f"{group}-check",
                                 request_timeout_ms=5_000)
    except Exception as exc:  # noqa: BLE001 - not knowing is an answer here
        log.warning("cannot describe group %s: %s", group, exc)
        return None
    try:
        # kafka-python's describe_groups() asks for authorized operations, and fails to parse
        # Tansu's answer to that ("15 is not a valid ACLOperation"): the request is sent raw.
        manager = admin._manager  # noqa: SLF001
        request = DescribeGroupsRequest(groups=[group], include_authorized_operations=False)

        async def describe():  # noqa: ANN202
            coordinator = (await admin._find_coordinator_ids([group]))[group]  # noqa: SLF001
            return await manager.send(request, node_id=coordinator)

        found = manager.run(describe).groups[0]
        if found.error_code:
            log.warning("describe group %s: error code %s", group, found.error_code)
            return None
        return {m.member_id for m in found.members}
    except Exception as exc:  # noqa: BLE001 - kafka-python internals may change: then unknown
        log.warning("cannot describe group %s: %s", group, exc)
        return None
    finally:
        admin.close()
