"""`freshrec bench chaos`: faults injected into the real processes, then every event checked.

One fresh deployment (`bench.stack.BenchStack`: Tansu, the features consumer, the trainer, the
API, each its own process, restarted by `freshrec up`'s supervisor when it exits) on a Redis
server this run owns (so it may flush, pause and restart it). A producer writes
sequence-numbered events (user, item, seq) to the broker the whole time; a prober asks
`GET /recommend` as users would. The faults run one after another, each a phase:

| phase | what is done |
| --- | --- |
| trainer_kill9 / features_kill9 | SIGKILL the process at a random moment, N times |
| trainer_sigterm / features_sigterm | SIGTERM (a deploy), N times |
| slow_step | the trainer stalls (SIGSTOP) 12 s: longer than max.poll.interval (10 s) |
| two_trainers | a second trainer runs beside the first for 10 s |
| hot_swaps | N new versions served while the prober asks 200 req/s |
| redis_sigstop | Redis paused 10 s |
| redis_flushall / redis_restart_empty | Redis loses everything mid-stream |
| broker_restart | the broker killed (-9) and started again, clients connected (after the check) |

Then the stream stops, the run settles, and `bench.chaos_check` judges every event. A fault's
`recovered_s` is the longest time from an injection until the pipeline is back within
`LAG_OK_S` of the stream with a version (or features) made after it. Writes DIR/chaos.json
and DIR/evidence.json; prints a table.

The broker keeps its log in memory. broker_restart runs on a durable broker when SeaweedFS is
installed (`freshrec[durable]`): Tansu on S3 storage, as `freshrec up --durable-broker` starts
it, so nothing it acknowledged may be lost when it is killed. With other faults in the run it
gets a short run of its own (a long log of small batches reads slowly from S3 storage; the
other faults keep the in-memory broker). `--broker memory|durable` puts the whole run on one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.chaos_check import Evidence, Phase, Record, check, partition_offsets
from bench.chaos_parts import ITEMS, OwnedRedis, Poster, Prober, Producer, VersionLog
from bench.stack import BenchStack

FULL = {"trainer_kill9": 50, "features_kill9": 20, "trainer_sigterm": 20,
        "features_sigterm": 20, "slow_step": 1, "two_trainers": 1, "hot_swaps": 100,
        "redis_sigstop": 1, "redis_flushall": 1, "redis_restart_empty": 1, "broker_restart": 1}
QUICK = {"trainer_kill9": 3, "features_kill9": 2, "trainer_sigterm": 1, "features_sigterm": 1,
         "redis_flushall": 1}
PARTITIONS = 2
LAG_OK_S = 3.0  # "recovered": the pipeline is at most this far behind the stream again
RECOVER_TIMEOUT_S = 120.0  # a recovery that takes longer is reported as "not_recovered"


class Chaos:
    """The run: stack, producer, prober, version log, and the faults."""

    def __init__(self, home: Path, rate: float, seed: int, encoder: str,
                 log: Callable[[str], None], durable_broker: bool = False) -> None:
        from freshrec.services import free_port
        from protocol.topics import ensure_topics

        self.log = log
        self.rng = random.Random(seed)
        self.redis = OwnedRedis(home / "redis", free_port())
        env = {"FRESHREC_PARTITIONS": str(PARTITIONS), "FRESHREC_DEVICE": "cpu",
               "FRESHREC_LEASE_TTL_MS": "3000", "FRESHREC_HISTORY_LEN": "1000000",
               "FRESHREC_USER_TTL_S": "0", "FRESHREC_KEEP_VERSIONS": "50"}
        if encoder:
            env["FRESHREC_ENCODER_PATH"] = encoder
        self.live = BenchStack(home, self.redis.url, env=env, prefix="chaos",
                               durable_broker=durable_broker)
        self.live.stack.BACKOFF_MAX_S = 1.0  # restart at once: the faults are the point here
        self.topic = self.live.env.get("FRESHREC_TOPIC_INTERACTIONS", "freshrec.interactions")
        self.items_topic = self.live.env.get("FRESHREC_TOPIC_ITEMS", "freshrec.items")
        self.bootstrap = self.live.env["FRESHREC_KAFKA_BOOTSTRAP"]
        ensure_topics(self.bootstrap, [self.topic, self.items_topic, "freshrec.dlq"], PARTITIONS)
        self.http = httpx.Client(base_url=self.live.base, timeout=10)
        self.supervising = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()
        self.producer = Producer(self.bootstrap, self.topic, rate, seed)
        self.prober = Prober(self.live.base, rate=20.0)
        self.versions = VersionLog(self.redis, self.live.namespace)
        self.phases: list[Phase] = []
        self.results: dict[str, dict[str, Any]] = {}

    def _supervise(self) -> None:
        """`freshrec up`'s loop: restart a child that exited."""
        while not self.supervising.wait(0.2):
            try:
                self.live.stack.check()
            except Exception as exc:  # noqa: BLE001 - the broker phase kills Tansu on purpose
                if "tansu" not in str(exc):
                    self.log(f"supervisor: {exc}")

    # ------------------------------------------------------------------ start and progress
    def start(self) -> None:
        from kafka import KafkaProducer

        self._wait("the API", lambda: self._get("/healthz") is not None, 120)
        prod = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        for i in range(ITEMS):
            prod.send(self.items_topic, key=str(i).encode(),
                      value=json.dumps({"item_id": str(i), "text": f"film number {i}"}).encode())
        prod.flush()
        prod.close()
        self.versions.start()
        self.producer.start()
        self._wait("a first served version", lambda: (self._model() or {}).get("version"), 180)
        self.prober.start()

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            r = self.http.get(path)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _model(self) -> dict[str, Any] | None:
        return self._get("/model")

    def _wait(self, what: str, predicate: Callable[[], Any], timeout_s: float) -> float:
        t0 = time.monotonic()
        while not predicate():
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def served_progress(self, after_wall: float) -> int:
        """Interactions the served version covers (summed offsets); 0 unless it was made
        after `after_wall` (a version from before the fault proves nothing)."""
        m = self._model() or {}
        if (m.get("created_at") or 0.0) <= after_wall:
            return 0
        offsets = m.get("trained_through", {}).get("offsets", {})
        return sum(partition_offsets(offsets, self.topic).values())

    def features_progress(self) -> int:
        try:
            raw = self.redis.client().hgetall(f"{self.live.namespace}:f:applied")
        except Exception:  # noqa: BLE001 - Redis paused or restarting
            return 0
        return sum(int(v) for k, v in raw.items() if k.decode().rpartition(":")[0] == self.topic)

    def recovered(self, t_inject: float, wall_inject: float, trainer: bool = True,
                  features: bool = True) -> float | None:
        """Seconds from the injection until the pipeline is within LAG_OK_S of the stream
        again, with a served version (and applied features) from after the injection; None
        if that took longer than RECOVER_TIMEOUT_S (the stacks of both consumers then go to
        their logs)."""
        def caught_up() -> bool:
            now = time.monotonic()
            need = max(self.producer.end_at(t_inject), self.producer.end_at(now - LAG_OK_S))
            return ((not trainer or self.served_progress(wall_inject) >= need) and
                    (not features or self.features_progress() >= need))
        try:
            self._wait("recovery", caught_up, RECOVER_TIMEOUT_S)
        except RuntimeError:
            self._dump_stacks()
            return None
        return time.monotonic() - t_inject

    # ------------------------------------------------------------------ phases
    def phase(self, name: str, fault: Callable[[], dict[str, Any]]) -> None:
        self.log(f"{name} ...")
        before = self.prober.snapshot()
        self.prober.reset_max_latency()
        restarts = {c.name: c.restarts for c in self.live.stack.children}
        seq0, t0 = self.producer.sent, time.time()
        try:
            out = fault()
        except RuntimeError as exc:  # a fault that could not be run is a figure, not a crash
            out = {"error": str(exc), "recovered_s": None}
        after = self.prober.snapshot()
        self.phases.append(Phase(name, seq0, self.producer.sent, t0, time.time()))
        out.setdefault("events", self.producer.sent - seq0)
        out.update(version_went_back=after.regressions - before.regressions,
                   http_5xx=after.http_5xx - before.http_5xx,
                   http_errors=after.errors - before.errors,
                   requests=after.requests - before.requests,
                   max_latency_s=round(after.max_latency_s, 3),
                   restarts={c.name: c.restarts - restarts.get(c.name, 0)
                             for c in self.live.stack.children if c.argv is not None})
        self.results[name] = out
        self.log(f"  {name}: {json.dumps(out)}")

    def _signal_child(self, name: str, sig: int) -> None:
        os.kill(self.live.child(name).proc.pid, sig)

    def _signalled(self, name: str, sig: int) -> bool:
        """Signal the child; False while it is between an exit and its restart."""
        try:
            self._signal_child(name, sig)
        except ProcessLookupError:
            return False
        return True

    def _dump_stacks(self) -> None:
        """SIGUSR1 to both consumers (their stacks go to their logs); one that is between a
        crash and its restart has no stack to give, which must not end the run."""
        for child in ("trainer", "features"):
            try:
                self._signal_child(child, signal.SIGUSR1)
            except ProcessLookupError:
                self.log(f"{child} was not running when its stack was asked for")

    def repeated(self, name: str, sig: int, n: int) -> dict[str, Any]:
        """Signal the process n times at random moments; after each, wait until it recovered
        and until its restarted process is back in its consumer group."""
        times = []
        for _ in range(n):
            time.sleep(self.rng.uniform(0.2, 2.5))
            t, wall = time.monotonic(), time.time()
            pid = self.live.child(name).proc.pid
            self._wait(f"{name} running", lambda: self._signalled(name, sig), 60)
            times.append(self.recovered(t, wall, trainer=name == "trainer",
                                        features=name == "features"))
            self._back_in_group(name, pid)
        return {"injections": n, **_worst_and_median(times)}

    def _back_in_group(self, name: str, old_pid: int) -> None:
        """Wait until the consumer restarted after `old_pid` handled an event produced after it
        started: only then is it a settled member of its group. Restarts are one process at a
        time already (the supervisor starts a child again only after it exited, and a consumer
        leaves its group before it exits); this makes the next fault wait for the join too.
        The features side counts as recovered while it is at most LAG_OK_S behind, so a
        restarted features consumer used to get its next SIGTERM 0.2-2.5 s after it started,
        while it was still joining; on the embedded Tansu a member that leaves while its group
        forms leaves the group stuck (consumers/loop.py, UNASSIGNED_S; the medium chaos run
        of 2026-11-30)."""
        try:
            self._wait(f"{name} restarted", lambda: self.live.child(name).proc.pid != old_pid,
                       60)
            started, started_wall = time.monotonic(), time.time()  # at or after its start
            end = self.producer.end_at(started)
            progress = ((lambda: self.served_progress(started_wall)) if name == "trainer"
                        else self.features_progress)
            self._wait(f"{name} consuming again", lambda: progress() > end, RECOVER_TIMEOUT_S)
        except RuntimeError as exc:  # reported by recovered() already; the run goes on
            self.log(f"  {exc}")

    def slow_step(self) -> dict[str, Any]:
        pid = self.live.child("trainer").proc.pid
        t, wall = time.monotonic(), time.time()
        os.kill(pid, signal.SIGSTOP)
        time.sleep(12.0)
        os.kill(pid, signal.SIGCONT)
        return {"injections": 1, **_worst_and_median([self.recovered(t, wall, features=False)])}

    def two_trainers(self) -> dict[str, Any]:
        """A second trainer beside the first for 10 s: the versions published meanwhile must
        carry one lease token, and tokens never go back (a fenced zombie publishes nothing)."""
        t0 = time.time()
        log = (self.live.home / "logs" / "trainer-2.log").open("ab")
        second = subprocess.Popen(self.live.argv("trainer"), env=self.live.env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(10.0)
        second.terminate()
        second.wait(timeout=20)
        t1 = time.time()
        ms = sorted(self.versions.manifests.values(), key=lambda m: m["created_at"])
        tokens = [m.get("trained_through", {}).get("lease_token") for m in ms
                  if t0 <= m["created_at"] < t1]
        every = [m.get("trained_through", {}).get("lease_token") or 0 for m in ms]
        backwards = sum(1 for a, b in zip(every, every[1:], strict=False) if b < a)
        return {"injections": 1, "publishers": len(set(tokens)), "versions": len(tokens),
                "token_went_back": backwards, "recovered_s": 0.0}

    def hot_swaps(self, n: int) -> dict[str, Any]:
        """Speed the prober up to 200 req/s until n new versions were served (or 30 + n s);
        req_per_s is what was answered, latency_* the answers' (from when each was sent)."""
        first = int((self._model() or {}).get("swaps", 0))
        self.prober.rate = 200.0
        before = self.prober.snapshot()
        t0 = time.monotonic()
        try:
            self._wait(f"{n} swaps", lambda: int((self._model() or {}).get("swaps", 0)) - first
                       >= n, 30 + n)
            note = ""
        except RuntimeError as exc:
            note = str(exc)
        t1 = time.monotonic()
        took = t1 - t0
        after = self.prober.snapshot()
        self.prober.rate = 20.0
        swaps = int((self._model() or {}).get("swaps", 0)) - first
        # the answers that came within the phase
        lat = sorted(x for t, x in list(self.prober.latencies) if t0 <= t <= t1)
        out = {"injections": swaps, "recovered_s": 0.0, "seconds": round(took, 1),
               "req_per_s": round((after.requests - before.requests) / took),
               "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
               "latency_p99_s": round(lat[int(len(lat) * 0.99)], 3) if lat else None}
        if note:
            out["short_of_target"] = f"{swaps} of {n} swaps in {took:.0f} s"
        return out

    def redis_sigstop(self) -> dict[str, Any]:
        assert self.redis.proc is not None
        t, wall = time.monotonic(), time.time()
        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        time.sleep(10.0)
        os.kill(self.redis.proc.pid, signal.SIGCONT)
        return {"injections": 1, **_worst_and_median([self.recovered(t, wall)])}

    def redis_lost(self, restart: bool) -> dict[str, Any]:
        """FLUSHALL (or kill and start again, empty): the API must keep serving its version,
        the trainer publish a full snapshot in a new epoch, the features be rebuilt."""
        serving = (self._model() or {}).get("version")
        t, wall = time.monotonic(), time.time()
        if restart:
            self.redis.kill()
            time.sleep(1.0)
            self.redis.start()
        else:
            self.redis.client().flushall()
        served = self._waited(t, lambda: ((self._model() or {}).get("created_at") or 0) > wall)
        rebuilt = self._waited(t, lambda: self.features_progress() >= self.producer.end_at(t))
        took = self.recovered(t, wall)
        epochs = {m.get("epoch") for m in self.versions.manifests.values()}
        return {"injections": 1, **_worst_and_median([took]), "served_before": serving,
                "new_version_served_s": served, "features_rebuilt_s": rebuilt,
                "epochs_seen": len(epochs)}

    def _waited(self, t_inject: float, predicate: Callable[[], Any]) -> float | None:
        """Seconds from the injection until `predicate` held (None: not within the timeout)."""
        try:
            self._wait("it", predicate, RECOVER_TIMEOUT_S)
        except RuntimeError:
            return None
        return round(time.monotonic() - t_inject, 2)

    BROKER_DOWN_S = 4.0  # how long the killed broker stays down

    def broker_restart(self) -> dict[str, Any]:
        """Kill -9 the broker while the consumers, a Kafka producer (acks=all, 20/s) and a
        client of POST /events (20/s) are connected; start it again BROKER_DOWN_S later on the
        same port and storage. While it is down, POST /events must answer 503 within 1 s and
        /recommend stay up (the prober's 5xx); once it is back, every event that got a 202 and
        every record the broker acknowledged (in the whole run) must be in the topic. That
        holds for a durable broker; the in-memory one loses its log, and the figures say so."""
        kafka = Producer(self.bootstrap, self.topic, 20.0, self.rng.randrange(1 << 30),
                         first_seq=self.producer.sent)
        poster = Poster(self.live.base, self.live.token, 20.0, self.rng.randrange(1 << 30))
        kafka.start()
        poster.start()
        time.sleep(3.0)  # events accepted before the fault
        tansu = self.live.child("tansu")
        t_kill = time.monotonic()
        tansu.proc.kill()
        tansu.proc.wait()
        time.sleep(self.BROKER_DOWN_S)
        t_restart = time.monotonic()
        tansu.proc = self.live.start_broker()
        t_up = time.monotonic()
        back = self._waited(t_up, lambda: any(p.code == 202 and p.t0 >= t_up
                                              for p in list(poster.posts)))
        time.sleep(3.0)  # and after it
        poster.stop()
        kafka.stop()
        down = [p for p in poster.posts if t_kill <= p.t0 and p.t1 <= t_restart]
        accepted = {p.seq for p in poster.posts if p.code == 202}
        refused = {p.seq for p in poster.posts if p.code != 202}
        acked = {e.seq: (e.partition, e.offset) for e in self.producer.events + kafka.events
                 if e.offset >= 0}
        log = self._read_log(self._log_ends(self.producer.events + kafka.events))
        in_log = {int(b["seq"]): (part, off) for part, off, b in log if "seq" in b}
        posted: dict[int, int] = {}
        for _, _, b in log:
            if "post_seq" in b:
                posted[int(b["post_seq"])] = posted.get(int(b["post_seq"]), 0) + 1
        lost_202 = sorted(accepted - set(posted))
        lost_acked = sorted(seq for seq, at in acked.items() if in_log.get(seq) != at)
        out: dict[str, Any] = {
            "injections": 1, "broker": self.live.broker_storage,
            "events": len(poster.posts) + kafka.sent,
            "lost": len(lost_202) + len(lost_acked),
            "duplicated": sum(n - 1 for n in posted.values()),
            "recovered_s": None if back is None else round(back + t_up - t_kill, 2),
            "post_events_202": f"{len(accepted) - len(lost_202)}/{len(accepted)} in the log",
            "acked_records": f"{len(acked) - len(lost_acked)}/{len(acked)} in the log",
            "post_events_while_down": len(down),
            "post_events_codes_while_down": sorted({p.code for p in down}),
            "post_events_slowest_while_down_s": round(max((p.t1 - p.t0 for p in down),
                                                          default=0.0), 3),
            "post_events_within_1s_while_down": sum(p.t1 - p.t0 <= 1.0 for p in down),
            # a 503 whose record the broker kept all the same (its acknowledgement was lost):
            # when it was sent, in seconds from the kill (a client retry would duplicate it)
            "post_events_503_delivered_anyway_at_s": [round(p.t0 - t_kill, 2)
                                                      for p in poster.posts
                                                      if p.seq in refused & set(posted)],
            "broker_start_s": round(t_up - t_restart, 2)}
        if lost_202 or lost_acked:
            out["detail"] = (f"202'd but missing: post_seq {lost_202[:10]}; acked but missing: "
                             f"seq {lost_acked[:10]}")
        if self.live.broker_storage.startswith("memory://"):
            out["note"] = ("in-memory broker: its log is gone with it (install freshrec[durable] "
                           "for the S3-backed one)")
        else:  # the consumers carry on from their committed offsets, past the restart
            ends = self._log_ends_read(log)
            out["features_caught_up_s"] = self._waited(
                t_kill, lambda: self.features_progress() >= sum(ends.values()))
        return out

    # ------------------------------------------------------------------ the end
    def settle(self, timeout_s: float) -> float:
        """Stop the stream; wait until the served version and the features cover all of it."""
        self.producer.stop()
        end = sum(self._log_ends().values())
        try:
            return self._wait("the stack to catch up", lambda: self.served_progress(0.0) >= end
                              and self.features_progress() >= end, timeout_s)
        except RuntimeError as exc:
            self.log(f"settle: {exc}")
            return float("nan")

    def _log_ends(self, events: list | None = None) -> dict[int, int]:  # noqa: ANN001
        """Per partition, one past the last offset the broker acknowledged to the producer."""
        ends: dict[int, int] = {}
        for e in self.producer.events if events is None else events:
            if e.offset >= 0:
                ends[e.partition] = max(ends.get(e.partition, 0), e.offset + 1)
        return ends

    @staticmethod
    def _log_ends_read(log: list[tuple[int, int, dict[str, Any]]]) -> dict[int, int]:
        ends: dict[int, int] = {}
        for part, off, _ in log:
            ends[part] = max(ends.get(part, 0), off + 1)
        return ends

    def _read_log(self, ends: dict[int, int]) -> list[tuple[int, int, dict[str, Any]]]:
        """The interactions topic from the beginning: (partition, offset, JSON body), read at
        least up to `ends`, and on until nothing new came for a second (10 s of nothing: what
        is there is all there is, e.g. an in-memory broker that lost its log)."""
        from kafka import KafkaConsumer
        from kafka.structs import TopicPartition

        parts = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        reader = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        reader.assign(parts)
        reader.seek_to_beginning(*parts)
        out: list[tuple[int, int, dict[str, Any]]] = []
        reached: dict[int, int] = {}
        last_batch = time.monotonic()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            batch = reader.poll(timeout_ms=500)
            for tp, recs in batch.items():
                for rec in recs:
                    out.append((tp.partition, rec.offset, json.loads(rec.value)))
                    reached[tp.partition] = rec.offset + 1
            now = time.monotonic()
            if batch:
                last_batch = now
            done = all(reached.get(p, 0) >= e for p, e in ends.items())
            if (done and now - last_batch > 1.0) or now - last_batch > 10.0:
                break
        reader.close()
        return out

    def evidence(self) -> Evidence:
        from kafka import KafkaConsumer
        from kafka.structs import TopicPartition

        parts = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        records = [Record(part, off, int(body["seq"]), body["user_id"], body["item_id"])
                   for part, off, body in self._read_log(self._log_ends())]
        group = KafkaConsumer(bootstrap_servers=self.bootstrap,
                              group_id=self.live.env.get("FRESHREC_TRAINER_GROUP",
                                                         "freshrec-trainer"),
                              enable_auto_commit=False)
        committed = {tp.partition: group.committed(tp) or 0 for tp in parts}
        group.close()
        m = self._model() or {}
        served = partition_offsets(m.get("trained_through", {}).get("offsets", {}), self.topic)
        r = self.redis.client()
        ns = f"{self.live.namespace}:f"
        users = sorted({rec.user for rec in records})
        histories = {u: [x.decode() for x in r.lrange(f"{ns}:hist:{u}", 0, -1)] for u in users}
        pop = sum(score for _, score in r.zrange(f"{ns}:pop", 0, -1, withscores=True))
        self.versions.stop_flag.set()
        return Evidence(self.topic, records,
                        {e.seq: (e.partition, e.offset) for e in self.producer.events
                         if e.offset >= 0},
                        committed, served, list(self.versions.manifests.values()), histories,
                        pop)

    def close(self) -> None:
        self.prober.stop_flag.set()
        self.versions.stop_flag.set()
        self.supervising.set()
        self.producer.stop_flag.set()
        self.http.close()
        self.live.close()
        self.redis.kill()


def _worst_and_median(times: Sequence[float | None]) -> dict[str, Any]:
    done = sorted(t for t in times if t is not None)
    return {"recovered_s": round(done[-1], 2) if done else None,
            "recovered_s_median": round(done[len(done) // 2], 2) if done else None,
            "not_recovered": len(times) - len(done)}


def run(counts: dict[str, int], home: Path, rate: float, seed: int, encoder: str,
        log: Callable[[str], None] = print,
        broker: str = "auto") -> tuple[dict[str, Any], Evidence]:
    """The whole run; returns (chaos.json's content, the evidence it was judged on).
    `broker`: memory, durable (S3 storage) or auto (see the module's docstring)."""
    from freshrec.services import durable_broker_available

    if broker != "auto":
        return _run(counts, home, rate, seed, encoder, log, durable=broker == "durable")
    durable = durable_broker_available()
    rest = {k: n for k, n in counts.items() if k != "broker_restart" and n}
    if not counts.get("broker_restart"):
        return _run(counts, home, rate, seed, encoder, log, durable=False)
    if not rest:
        return _run(counts, home, rate, seed, encoder, log, durable=durable)
    result, ev = _run(rest, home, rate, seed, encoder, log, durable=False)
    log("broker_restart: a run of its own" + (" on a durable broker" if durable else ""))
    sub, _ = _run({"broker_restart": counts["broker_restart"]}, home / "broker-fault", rate,
                  seed, encoder, log, durable=durable)
    entry = sub["faults"]["broker_restart"]
    stream = sub["faults"].get("between") or {}
    entry["its_stream"] = {k: stream.get(k) for k in ("events", "lost", "duplicated",
                                                      "untrained")}
    result["faults"]["broker_restart"] = entry
    return result, ev


def _run(counts: dict[str, int], home: Path, rate: float, seed: int, encoder: str,
         log: Callable[[str], None], durable: bool) -> tuple[dict[str, Any], Evidence]:
    t_start = time.monotonic()
    chaos = Chaos(home, rate, seed, encoder, log, durable_broker=durable)
    log(f"broker: tansu on {chaos.live.broker_storage}")
    try:
        chaos.start()
        log(f"stack up in {time.monotonic() - t_start:.0f} s; faults next")
        plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("trainer_kill9", lambda: chaos.repeated("trainer", signal.SIGKILL,
                                                     counts["trainer_kill9"])),
            ("features_kill9", lambda: chaos.repeated("features", signal.SIGKILL,
                                                      counts["features_kill9"])),
            ("trainer_sigterm", lambda: chaos.repeated("trainer", signal.SIGTERM,
                                                       counts["trainer_sigterm"])),
            ("features_sigterm", lambda: chaos.repeated("features", signal.SIGTERM,
                                                        counts["features_sigterm"])),
            ("slow_step", chaos.slow_step),
            ("two_trainers", chaos.two_trainers),
            ("hot_swaps", lambda: chaos.hot_swaps(counts["hot_swaps"])),
            ("redis_sigstop", chaos.redis_sigstop),
            ("redis_flushall", lambda: chaos.redis_lost(restart=False)),
            ("redis_restart_empty", lambda: chaos.redis_lost(restart=True)),
        ]
        for name, fault in plan:
            if counts.get(name):
                chaos.phase(name, fault)
        settle_s = chaos.settle(90.0)
        log(f"stream stopped; caught up in {settle_s:.1f} s; checking every event")
        ev = chaos.evidence()
        figures = check(ev, chaos.phases)
        for name, fig in figures.items():
            entry = chaos.results.setdefault(name, {"injections": 0, "events": 0,
                                                    "http_5xx": 0, "recovered_s": None})
            entry.update(lost=fig.lost, duplicated=fig.duplicated, untrained=fig.untrained,
                         detail=fig.detail)
        if counts.get("broker_restart"):
            chaos.phase("broker_restart", chaos.broker_restart)
        result = {"faults": chaos.results,
                  "run": {"events": len(ev.records), "acked": len(ev.acked),
                          "versions": len(ev.manifests), "rate": rate,
                          "settle_s": settle_s, "wall_s": round(time.monotonic() - t_start),
                          "broker": chaos.live.broker_storage,
                          "machine": f"{os.cpu_count()} CPU cores, {sys.platform}",
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
        return result, ev
    finally:
        chaos.close()


def format_table(result: dict[str, Any]) -> str:
    head = ("| fault | injections | events | lost | duplicated | untrained | http 5xx | "
            "recovered (s, worst) | notes |")
    lines = [head, "|" + " --- |" * 9]
    for name, r in result["faults"].items():
        notes = {k: v for k, v in r.items() if k not in (
            "injections", "events", "lost", "duplicated", "untrained", "http_5xx",
            "recovered_s", "requests", "detail") and v not in (None, {}, 0)}
        if r.get("detail"):
            notes["detail"] = r["detail"]
        lines.append(f"| {name} | {r.get('injections')} | {r.get('events')} | {r.get('lost')} | "
                     f"{r.get('duplicated')} | {r.get('untrained', '-')} | {r.get('http_5xx')} | "
                     f"{r.get('recovered_s')} | {json.dumps(notes)[1:-1]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``freshrec bench chaos [--quick] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="freshrec bench chaos", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the CI size (a few of each)")
    p.add_argument("--only", default="", help="comma-separated faults to run, each optionally "
                   "NAME=COUNT (default: all, at the full or --quick size)")
    p.add_argument("--rate", type=float, default=100.0, help="events per second produced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default="", help="encoder folder; default: a tiny random BERT "
                   "(the faults, not the model, are under test); 'minilm' for the real one")
    p.add_argument("--broker", choices=["auto", "memory", "durable"], default="auto",
                   help="the broker's storage: auto (default) runs broker_restart on a durable "
                   "broker (S3 storage in a local SeaweedFS, freshrec[durable]) when installed, "
                   "the other faults on the in-memory one")
    p.add_argument("--home", default=".freshrec/bench-chaos", help="logs of the stack")
    p.add_argument("--out", default="bench/out/chaos")
    args = p.parse_args(argv)
    counts = dict(QUICK if args.quick else FULL)
    if args.only:  # "trainer_kill9=10,redis_flushall": these faults only, N times each
        wanted = dict(part.partition("=")[::2] for part in args.only.split(",") if part)
        unknown = set(wanted) - set(FULL)
        if unknown:
            p.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FULL)}")
        counts = {k: int(wanted[k]) if wanted.get(k) else (QUICK.get(k, 1) if args.quick
                                                          else FULL[k])
                  for k in FULL if k in wanted}
    home = Path(args.home)
    encoder = args.encoder
    if not encoder:
        from freshrec.tiny_encoder import make_tiny_encoder

        encoder = str(make_tiny_encoder(home / "tiny-bert"))
    elif encoder == "minilm":
        encoder = ""
    result, ev = run(counts, home, args.rate, args.seed, encoder,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True), broker=args.broker)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "evidence.json").write_text(json.dumps(ev.to_json()) + "\n")
    print(format_table(result))
    print(f"wrote {out / 'chaos.json'} and {out / 'evidence.json'}")
    bad = sum((r.get("lost") or 0) + (r.get("untrained") or 0)
              for r in result["faults"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
