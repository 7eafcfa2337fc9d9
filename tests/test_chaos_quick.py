"""The short chaos run (issue 9, invariant 6): `freshrec bench chaos --quick` kills and stops the
real consumer processes, flushes Redis mid-stream, and then checks every event. Nothing may be
lost, and the API must not fail a request.

The judge must be able to fail: the same run's evidence, with an event deliberately lost (its
offset committed but not in the served weights; a history entry gone; a version that trained
events twice), is reported as exactly that."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from bench.chaos_check import Evidence, check, manifest_digest
from freshrec import cli
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Evidence, float]:
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(ROOT))  # the stack's processes import the checkout
    mp.chdir(ROOT)
    out = tmp_path_factory.mktemp("chaos")
    t0 = time.monotonic()
    try:
        cli.main(["bench", "chaos", "--quick", "--home", str(out / "home"), "--out",
                  str(out / "out")])
    finally:
        mp.undo()
    took = time.monotonic() - t0
    result = json.loads((out / "out" / "chaos.json").read_text())
    ev = Evidence.from_json(json.loads((out / "out" / "evidence.json").read_text()))
    return result, ev, took


def test_quick_chaos_run_loses_nothing_and_fails_no_request(quick_run) -> None:
    result, ev, took = quick_run
    faults = result["faults"]
    assert {"trainer_kill9", "features_kill9", "redis_flushall"} <= set(faults), faults
    assert len(ev.records) > 1000 and len(ev.acked) == len(ev.records), result["run"]
    for name, r in faults.items():
        assert r["lost"] == 0, f"{name}: {r}"
        assert r["untrained"] == 0, f"{name}: {r}"
        assert r["http_5xx"] == 0 and r.get("http_errors", 0) == 0, f"{name}: {r}"
        assert "error" not in r and not r.get("not_recovered"), f"{name} did not recover: {r}"
    for name in ("features_kill9", "features_sigterm", "redis_flushall"):
        assert faults[name]["duplicated"] == 0, f"{name}: {faults[name]}"
    for name in ("trainer_kill9", "trainer_sigterm"):  # at most one micro-batch per kill
        assert faults[name]["duplicated"] <= 256 * faults[name]["injections"], faults[name]
    assert faults["redis_flushall"]["epochs_seen"] >= 2, "no full snapshot under a new epoch"
    print(f"quick chaos run: {took:.0f} s, {len(ev.records)} events")


def test_the_judge_reports_an_event_deliberately_lost(quick_run) -> None:
    _, real, _ = quick_run
    assert sum(f.lost + f.duplicated for f in check(real, []).values()) == 0

    committed_not_served = copy.deepcopy(real)  # the served weights stop one event short
    p = max(committed_not_served.served, key=lambda k: committed_not_served.served[k])
    committed_not_served.served[p] -= 1
    figures = check(committed_not_served, [])["between"]
    assert figures.lost == 1 and figures.detail == {"committed_not_trained": 1}, figures

    history_gap = copy.deepcopy(real)  # one entry gone from a user's history
    user = next(iter(history_gap.histories))
    del history_gap.histories[user][len(history_gap.histories[user]) // 2]
    figures = check(history_gap, [])["between"]
    assert figures.detail == {"missing_from_history": 1}, figures

    history_twice = copy.deepcopy(real)  # one event applied twice
    history_twice.histories[user].insert(3, history_twice.histories[user][3])
    figures = check(history_twice, [])["between"]
    assert figures.detail == {"extra_in_history": 1}, figures

    trained_twice = copy.deepcopy(real)  # a version claims 5 events more than its span
    digests = {manifest_digest(m) for m in trained_twice.manifests}
    newest = max((m for m in trained_twice.manifests if m.get("parent_digest") in digests),
                 key=lambda m: m["created_at"])  # the newest with a known parent: no child
    newest["trained_through"]["events"] += 5
    figures = check(trained_twice, [])["between"]
    assert figures.detail == {"trained_twice": 5}, figures

    never_stored = copy.deepcopy(real)  # the broker acknowledged an event it does not hold
    gone = never_stored.records.pop()
    assert gone.seq in never_stored.acked
    figures = check(never_stored, [])["between"]
    assert figures.detail.get("acked_not_in_log") == 1, figures


def test_results_file_has_the_issue_shape(quick_run) -> None:
    result, _, _ = quick_run
    for r in result["faults"].values():
        assert {"injections", "events", "lost", "duplicated", "http_5xx", "recovered_s"} <= set(r)


def test_evidence_round_trips(quick_run, tmp_path: Path) -> None:
    _, ev, _ = quick_run
    path = tmp_path / "ev.json"
    path.write_text(json.dumps(ev.to_json()))
    assert Evidence.from_json(json.loads(path.read_text())) == ev
