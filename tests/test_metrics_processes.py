"""Metrics stay correct with several API processes: one process per replica, never workers.

prometheus-client keeps its registry in process memory. `uvicorn --workers N` would fork N
registries behind one port, and each scrape would see one worker's counters at random, so
freshrec scales out with replicas instead (compose runs two), each scraped as its own target;
see service/metrics.py and docs/operations.md ("One process per replica"). These tests hold both
halves: every way freshrec starts the API runs a single uvicorn process, and two API processes
each report exactly their own counters.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import redis
import yaml

from tests.api_server import ApiServer, get
from tests.conftest import ROOT, wait_for
from tests.helpers import HMAC_KEY, Publisher, make_events, make_items, metric_value, seed_features

WORKERS = re.compile(r"--workers\b|WEB_CONCURRENCY|PROMETHEUS_MULTIPROC_DIR|prometheus_multiproc")


def _argv(command: object) -> str:
    return " ".join(command) if isinstance(command, list) else str(command or "")


def test_every_entry_point_runs_one_api_process_per_replica() -> None:
    # The image's default command is the API server, and compose's api-N services use it.
    cmds = [line for line in (ROOT / "Dockerfile").read_text().splitlines()
            if line.startswith(("CMD", "ENTRYPOINT"))]
    assert cmds, "the Dockerfile has no CMD"
    cmd = json.loads(cmds[-1].split(None, 1)[1])
    assert cmd[0] == "uvicorn" and not WORKERS.search(" ".join(cmd)), cmd

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    apis = [name for name, svc in compose["services"].items()
            if "uvicorn" in _argv(svc.get("command")) or
            (svc.get("build") or svc.get("image", "").startswith("freshrec"))
            and not svc.get("command")]
    assert len(apis) >= 2, f"compose should scale the API with replicas, found {apis}"
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        env_text = " ".join(env) if isinstance(env, list) else " ".join(f"{k}={v}" for k, v
                                                                       in env.items())
        for text in (_argv(svc.get("command")), _argv(svc.get("entrypoint")), env_text):
            assert not WORKERS.search(text), f"compose service {name}: {text}"
    assert not WORKERS.search((ROOT / ".env.example").read_text())

    # `freshrec up` and every script start uvicorn without workers.
    for path in [ROOT / "freshrec" / "cli.py", *sorted((ROOT / "scripts").glob("*.sh"))]:
        assert not WORKERS.search(path.read_text()), path
    cli = (ROOT / "freshrec" / "cli.py").read_text()
    assert '"uvicorn", "service.app:app"' in cli, "freshrec up no longer starts uvicorn this way"


@pytest.mark.integration
def test_two_api_processes_each_report_only_their_own_counters(
        redis_url: str, namespace: str, tiny_encoder_path: str, tiny_encoder,
        tmp_path: Path) -> None:
    env = {**os.environ, "FRESHREC_REDIS_URL": redis_url, "FRESHREC_NAMESPACE": namespace,
           "FRESHREC_HMAC_KEY": HMAC_KEY, "FRESHREC_ENCODER_PATH": tiny_encoder_path,
           "FRESHREC_POLL_INTERVAL_S": "0.2", "FRESHREC_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    for k in ("WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        env.pop(k, None)
    servers = [ApiServer(env, tmp_path / f"api-{n}.log") for n in range(2)]  # start together
    try:
        client = redis.Redis.from_url(redis_url)
        items = make_items(20)
        events = make_events(items, users=4, n=40)
        seed_features(client, namespace, items, events)
        version = Publisher(client, namespace, tiny_encoder_path, encoder=tiny_encoder,
                            items=items, events=events).publish().version
        for s in servers:
            s.wait_ready()
        a, b = servers

        def scrape(s: ApiServer) -> str:
            return get(f"{s.base}/metrics")[1].decode()

        for s in servers:
            wait_for(lambda s=s: metric_value(scrape(s), "freshrec_model_version") == version,
                     20, f"{s.base} to serve v{version}")
        for _ in range(7):
            assert get(f"{a.base}/readyz")[0] == 200
        for _ in range(3):
            assert get(f"{b.base}/readyz")[0] == 200
        assert get(f"{b.base}/recommend?user_id=u1")[0] == 200
        ta, tb = scrape(a), scrape(b)
    finally:
        for s in servers:
            s.stop()

    count = "freshrec_http_request_duration_seconds_count"
    readyz = {"route": "/readyz", "method": "GET", "status": "200"}
    recommend = {"route": "/recommend", "method": "GET", "status": "200"}
    assert (metric_value(ta, count, readyz), metric_value(tb, count, readyz)) == (7, 3)
    assert (metric_value(ta, count, recommend), metric_value(tb, count, recommend)) == (0, 1)
    # Each process swapped once, to the same version, and observed that version's freshness
    # sample once: nothing is shared, nothing is counted twice.
    for text in (ta, tb):
        assert metric_value(text, "freshrec_model_version") == version
        assert metric_value(text, "freshrec_model_swaps_total") == 1
        assert metric_value(text, "freshrec_freshness_seconds_count") == 1
