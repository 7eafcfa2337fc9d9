"""Operator rollback (issue 9): `POST /admin/rollback` and `freshrec rollback --to VERSION`.

The served version moves back, the trainer starts over from that version and from the offsets
stored with it (so the events after it are trained again, not lost), and the API follows.
Real broker, Redis, trainer process and API process."""

from __future__ import annotations

import json
import urllib.request

import pytest
import redis

from freshrec import cli
from model.events import Item
from protocol.features import FeatureStore
from protocol.weights import WeightStore
from tests.api_server import api_server, get_json
from tests.conftest import wait_for
from tests.test_at_least_once import committed_total, interactions_through, send_events

pytestmark = pytest.mark.integration
ADMIN = "admin-token-for-tests"


def post_rollback(base: str, version: int, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/admin/rollback", method="POST",
                                 data=json.dumps({"version": version}).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token
                                             else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_rollback_moves_the_served_version_back_and_retrains_what_followed(
        stack_env, spawn, tmp_path, monkeypatch) -> None:
    env = {**stack_env, "FRESHREC_BATCH_MAX_EVENTS": "1000", "FRESHREC_BATCH_WINDOW_MS": "500",
           "FRESHREC_ADMIN_TOKEN": ADMIN, "FRESHREC_LEASE_TTL_MS": "3000"}
    client = redis.Redis.from_url(env["FRESHREC_REDIS_URL"])
    FeatureStore(client, env["FRESHREC_NAMESPACE"]).upsert_items(
        [Item(str(i), f"item {i}") for i in range(10)])
    store = WeightStore(client, env["FRESHREC_HMAC_KEY"].encode(), env["FRESHREC_NAMESPACE"])

    def newest_through(n: int):  # noqa: ANN202
        v = store.current()
        m = store.manifest(v) if v else None
        return m if m is not None and interactions_through(env, m) == n else None

    trainer = spawn("consumers.trainer", env)
    send_events(env, 0, 60)
    v1 = wait_for(lambda: newest_through(60), 90, "a version through 60 events")
    wait_for(lambda: committed_total(env) == 60, 30, "the first 60 events committed")
    send_events(env, 60, 60)
    v2 = wait_for(lambda: newest_through(120), 90, "a version through 120 events")
    wait_for(lambda: committed_total(env) == 120, 30, "all 120 events committed")

    with api_server(env, tmp_path / "api.log") as api:
        wait_for(lambda: get_json(f"{api.base}/model")["version"] == v2.version, 30,
                 "the API serving the newest version")
        assert post_rollback(api.base, v1.version, None)[0] == 401
        assert post_rollback(api.base, v1.version, env["FRESHREC_API_TOKEN"])[0] == 401, \
            "the events token must not roll the model back"
        assert post_rollback(api.base, 10_000, ADMIN)[0] == 404
        code, body = post_rollback(api.base, v1.version, ADMIN)
        assert code == 200, body
        assert body["version"] == v1.version and body["previous"] == v2.version

        # the trainer starts over from v1 and its offsets: events 60..120 are trained again
        retrained = wait_for(lambda: (m := newest_through(120)) and m.parent == v1.version
                             and m, 90, "a version trained again from the rolled-back one")
        assert retrained.version > v2.version
        assert retrained.trained_through["events"] == 60, retrained.trained_through
        wait_for(lambda: get_json(f"{api.base}/model")["version"] == retrained.version, 30,
                 "the API following the retrained version")
        assert store.rollback_record()["version"] == v1.version

    # the CLI, to a version of the abandoned branch: nothing to retrain, new events go on it
    monkeypatch.setenv("FRESHREC_HMAC_KEY", env["FRESHREC_HMAC_KEY"])
    assert cli.main(["rollback", "--to", str(v2.version), "--redis", env["FRESHREC_REDIS_URL"],
                     "--namespace", env["FRESHREC_NAMESPACE"]]) == 0
    assert store.current() == v2.version
    send_events(env, 120, 12)
    after = wait_for(lambda: (m := newest_through(132)) and m.parent == v2.version and m, 90,
                     "a version on top of the version rolled back to")
    assert after.trained_through["events"] == 12, after.trained_through
    wait_for(lambda: committed_total(env) == 132, 30, "commits following the weights")
    assert trainer.p.poll() is None, trainer.output()
    assert "starting over from the current version" in trainer.log.read_text(errors="replace")
