"""Reproduce: a consumer group on the embedded Tansu 0.6.0 never settles again after two
members overlap and one leaves cleanly (a rolling restart). Found by `freshrec bench chaos`
(the features group, 2026-11-30): "SyncGroup ... failed due to coordinator rebalance" forever.

    python -m bench.tansu_group

Measured on this 2-core machine, 2026-11-30 04:09 UTC: A assigned after 3.1 s; B (started 1 s
before A got SIGTERM) never assigned within 30 s; C, alone, 10 s after B left, never assigned
within 40 s. The same members restarted one after another (no overlap) are assigned after
3.1 s every time. Not reproduced against Apache Kafka (docker-compose) here: no Kafka on this
machine.

2026-11-30 05:20 UTC, same machine: one member at a time is enough. D, alone in a fresh group,
stopped (SIGTERM) 0.5, 1.5 or 2.5 s after it started, i.e. during its own ~3 s first join; E,
started after D exited, never assigned (30 s). That is how the chaos run's features group got
stuck: its SIGTERMs came 0.2-2.5 s after a restart. Why (Tansu's group coordinator): a member
that leaves while the group is forming is removed, but the group keeps its id as leader, and
only the leader's SyncGroup forms the group. Polls return on time meanwhile (timeout_ms=100:
at most 0.14 s over 60 s). A fresh consumer in the stuck group (a new member id) stays outside
(4 tries in 60 s); one that joins under the departed leader's member id is assigned 3.0 s later
(what consumers.loop.Transport does after UNASSIGNED_S).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEMBER = '''
import signal, sys, time
from kafka import KafkaConsumer
c = KafkaConsumer(bootstrap_servers=sys.argv[1], group_id=sys.argv[3], enable_auto_commit=False,
                  auto_offset_reset="earliest", max_poll_interval_ms=10_000,
                  session_timeout_ms=6_000, heartbeat_interval_ms=1_500)
c.subscribe([sys.argv[2]])
running = [True]
signal.signal(signal.SIGTERM, lambda *_: running.clear())
t0, told = time.time(), False
while running:
    c.poll(timeout_ms=100)
    if c.assignment() and not told:
        told = True
        print(f"assigned after {time.time() - t0:.1f} s", flush=True)
c.close(autocommit=False)
'''


def main() -> int:
    from freshrec.services import free_port, start_tansu
    from protocol.topics import ensure_topics

    home = Path(tempfile.mkdtemp(prefix="tansu-group-"))
    port = free_port()
    boot = f"127.0.0.1:{port}"
    broker = start_tansu(port, home / "tansu.log")
    ensure_topics(boot, ["t"], 2)
    (home / "member.py").write_text(MEMBER)

    def start(group: str = "g") -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, str(home / "member.py"), boot, "t", group],
                             stdout=subprocess.PIPE, text=True)
        os.set_blocking(p.stdout.fileno(), False)  # type: ignore[union-attr]
        return p

    def assigned(p: subprocess.Popen, seconds: float) -> str:
        t0 = time.time()
        while time.time() - t0 < seconds:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line:
                return line.strip()
            time.sleep(0.2)
        return f"NOT assigned within {seconds:.0f} s"

    def stop(p: subprocess.Popen) -> None:
        p.send_signal(signal.SIGTERM)
        p.wait(20)

    try:
        a = start()
        print("A alone:", assigned(a, 30))
        b = start()
        time.sleep(1.0)
        stop(a)  # a rolling restart: B joined before A left
        print("B (joined 1 s before A left cleanly):", assigned(b, 30))
        stop(b)
        time.sleep(10.0)
        c = start()
        print("C (alone, 10 s after B left):", assigned(c, 40))
        stop(c)
        d = start("g2")
        time.sleep(1.5)
        stop(d)  # one member at a time, stopped during its own first join
        e = start("g2")
        print("E (alone, after D was stopped 1.5 s into its join):", assigned(e, 30))
        stop(e)
    finally:
        broker.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
