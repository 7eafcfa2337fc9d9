"""Issue 9, #10-#11: the model holder under versions it cannot build.

A version that verifies but cannot be built for another reason (here: a signed manifest whose
config an older server cannot parse, as in a rolling deploy) used to be loaded and built again
at every poll, forever. It is now retried with a growing pause, counted, and the last good
version keeps serving."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import pytest
import redis
from helpers import (
    Publisher,
    client_for,
    make_events,
    make_items,
    metric_value,
    seed_features,
    settings,
    wait_until,
)


def test_a_version_that_fails_to_build_is_not_rebuilt_at_every_poll(
        redis_url: str, namespace: str, tiny_encoder_path: str, tiny_encoder,  # noqa: ANN001
        caplog: pytest.LogCaptureFixture) -> None:
    r = redis.Redis.from_url(redis_url)
    items = make_items(20)
    events = make_events(items, users=3, n=30)
    pub = Publisher(r, namespace, tiny_encoder_path, tiny_encoder, items, events)
    seed_features(r, namespace, items, events)
    good = pub.publish()
    with client_for(settings(redis_url, namespace, tiny_encoder_path, poll_interval_s=0.1)) as c:
        wait_until(lambda: c.get("/model").json()["version"] == good.version, 10, "good version")
        caplog.clear()
        caplog.set_level(logging.ERROR, logger="freshrec.service")
        odd = {**asdict(pub.cfg), "adaptive_lr_range": 5}  # a config this server cannot parse
        bad = pub.store.publish(pub.blob(), parent=good, kind="full", config=odd,
                                encoder=pub.learner.encoder.identity, trained_through={})
        time.sleep(4)  # 40 polls
        attempts = [rec for rec in caplog.records if rec.name == "freshrec.service"]
        assert c.get("/model").json()["version"] == good.version
        assert 1 <= len(attempts) <= 4, \
            f"{len(attempts)} failed builds of version {bad.version} in 4 s (one per poll?)"
        text = c.get("/metrics").text
        assert metric_value(text, "freshrec_model_swap_failures_total",
                            {"reason": "build_error"}) >= 1
        assert c.get("/healthz").status_code == 200  # failing builds are not a hang

        nxt = pub.publish()  # the next good version is served as usual
        wait_until(lambda: c.get("/model").json()["version"] == nxt.version, 10, "next version")
