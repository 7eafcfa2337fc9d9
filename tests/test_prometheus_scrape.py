"""A real Prometheus server scrapes the embedded stack: both consumers and the API process.

Events flow through a real broker into the trainer, the API swaps to the versions it publishes,
and Prometheus (Debian's `prometheus`, scraping every second on loopback) is asked through its
HTTP API for the freshness histogram and the online HR@10 gauge. That proves the metrics are
scrapeable by the real consumer of the format, not just printed.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api_server import ApiServer, get, get_json
from tests.conftest import free_port, produce, stop_process, wait_for

pytestmark = pytest.mark.integration

N_ITEMS = 30
N_EVENTS = 300
# Both consumers import consumers.metrics, so the features process exports this gauge too (and
# it stays 0 there): the trainer's is the one that means something.
HR = 'freshrec_online_hr_at_10{job="freshrec-trainer"}'


class Prometheus:
    def __init__(self, folder: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            for job, port in targets.items())
        config = folder / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
                          f"scrape_configs:\n{jobs}")
        self.log = folder / "prometheus.log"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._fh, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[dict]:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n"
                                 + self.log.read_text(errors="replace")[-3000:])
        try:
            status, body = get(f"{self.base}/api/v1/query?"
                               + urllib.parse.urlencode({"query": expr}), timeout=3)
        except OSError:
            return []  # not listening yet
        reply = json.loads(body) if status in (200, 400, 422) else {}
        assert reply.get("status", "success") == "success", reply
        return reply.get("data", {}).get("result", [])

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        self._fh.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator:
    """prometheus(targets) starts a server scraping {job: port}; it is stopped at teardown."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (scripts/check_deploy.sh installs it)")
    started: list[Prometheus] = []

    def _start(targets: dict[str, int]) -> Prometheus:
        folder = tmp_path / f"prometheus-{len(started)}"
        folder.mkdir()
        started.append(Prometheus(folder, targets))
        return started[-1]

    yield _start
    for p in started:
        p.stop()


def test_real_prometheus_scrapes_freshness_and_online_quality(
        stack_env: dict[str, str], spawn, prometheus, tmp_path: Path) -> None:
    ports = {"freshrec-features": free_port(), "freshrec-trainer": free_port(),
             "freshrec-api": free_port()}
    env = {**stack_env, "FRESHREC_FEATURES_METRICS_PORT": str(ports["freshrec-features"]),
           "FRESHREC_TRAINER_METRICS_PORT": str(ports["freshrec-trainer"]),
           "FRESHREC_POLL_INTERVAL_S": "0.2"}
    rng = random.Random(0)
    items = [{"item_id": str(i), "text": f"movie {i} {rng.choice(['drama', 'comedy', 'noir'])}"}
             for i in range(N_ITEMS)]
    produce(env, "FRESHREC_TOPIC_ITEMS", items, "item_id")
    spawn("consumers.features", env)
    trainer = spawn("consumers.trainer", env)
    api = ApiServer(env, tmp_path / "api.log", port=ports["freshrec-api"])
    try:
        prom = prometheus(ports)  # scrape failures until the processes are up are fine
        events = [{"user_id": f"u{n % 25}", "item_id": str(rng.randrange(N_ITEMS)),
                   "event": "click", "ts": 1_000_000.0 + n} for n in range(N_EVENTS)]
        produce(env, "FRESHREC_TOPIC_INTERACTIONS", events, "user_id")
        api.wait_ready()

        def served_fresh() -> bool:
            if trainer.p.poll() is not None:
                pytest.fail(f"the trainer exited:\n{trainer.output()}")
            return get_json(f"{api.base}/status")["freshness_seconds"]["count"] > 0
        wait_for(served_fresh, 60, "the API to swap to a trained version")

        def scraped() -> dict[str, list[dict]]:
            got = {expr: prom.query(expr) for expr in (
                "freshrec_freshness_seconds_count > 0", HR,
                'up{job=~"freshrec-.*"} == 1')}
            return got if all(got.values()) else {}
        got = wait_for(scraped, 30, "Prometheus to scrape the freshness histogram and HR@10")
        # What the status page shows of the trainer comes from the served version's manifest.
        # (A first version trained on one poll's worth of backlog has no rate yet: no time
        # passed between its first event and its publish. The next one has.)
        trainer_numbers = wait_for(
            lambda: (t := get_json(f"{api.base}/status")["trainer"]) and
            t["events_per_s"] is not None and t, 30, "a served version with a trainer rate")
    finally:
        api.stop()

    fresh = got["freshrec_freshness_seconds_count > 0"]
    assert [r["metric"]["job"] for r in fresh] == ["freshrec-api"]
    assert float(fresh[0]["value"][1]) > 0
    hr = got[HR]
    assert len(hr) == 1
    assert 0.0 <= float(hr[0]["value"][1]) <= 1.0
    assert {r["metric"]["job"] for r in got['up{job=~"freshrec-.*"} == 1']} == set(ports)
    assert 0.0 <= trainer_numbers["online_hr@10"] <= 1.0, trainer_numbers
    assert 0.0 <= trainer_numbers["online_ndcg@10"] <= 1.0, trainer_numbers
    assert trainer_numbers["events_per_s"] > 0 and trainer_numbers["events"] > 0, trainer_numbers
    assert trainer_numbers["dlq"] == 0, trainer_numbers
