"""Issue 9, #9 under `freshrec up`: one crashed child is restarted (with backoff, reported),
not the end of the whole stack; a second stack on one machine gets a clear message or free
ports instead of a raw "Address already in use" traceback."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from freshrec import services
from freshrec.cli import Stack
from tests.conftest import wait_for

CHILD = "import os, sys, time; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n'); time.sleep(60)"


def test_a_killed_child_is_restarted_and_a_crashing_one_backs_off(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = Stack(tmp_path / "logs")
    stack.BACKOFF_MIN_S = 0.2  # type: ignore[misc] - the schedule, scaled down for a test
    pids = tmp_path / "pids"
    stack.spawn("worker", [sys.executable, "-c", CHILD, str(pids)], dict(os.environ))
    crasher = [sys.executable, "-c", "raise SystemExit(3)"]
    stack.spawn("crasher", crasher, dict(os.environ))
    try:
        first = int(wait_for(lambda: pids.exists() and pids.read_text().split(), 20,
                             "the worker's pid")[0])
        os.kill(first, signal.SIGKILL)  # kill -9, as in the measurement

        def restarted() -> list[str]:
            stack.check()  # the `freshrec up` loop calls this every 2 s
            started = pids.read_text().split()
            return started[1:]

        t0 = time.monotonic()
        second = int(wait_for(restarted, 20, "the worker started again")[0])
        os.kill(second, 0)  # alive
        while time.monotonic() - t0 < 3:  # the crasher exits at once, every time
            stack.check()
            time.sleep(0.05)
        err = capsys.readouterr().err
        assert "worker exited with -9" in err and "worker restarted" in err, err
        restarts = err.count("crasher restarted")
        # backoff 0.2, 0.4, 0.8, 1.6 s ... : a handful in 3 s, not one per check (~60)
        assert 2 <= restarts <= 5, err
    finally:
        stack.stop()


def test_a_second_stack_gets_free_metrics_ports_and_a_clear_message_for_the_api_port() -> None:
    from freshrec.cli import claim_ports

    with socket.socket() as a, socket.socket() as b:
        for s in (a, b):
            s.bind(("0.0.0.0", 0))
            s.listen()
        taken_metrics, taken_api = a.getsockname()[1], b.getsockname()[1]
        env = {"FRESHREC_FEATURES_METRICS_PORT": str(taken_metrics),
               "FRESHREC_TRAINER_METRICS_PORT": "0"}  # 0: no metrics server, left alone
        claim_ports(env, "127.0.0.1", services.free_port())
        moved = int(env["FRESHREC_FEATURES_METRICS_PORT"])
        assert moved != taken_metrics and services.port_free("0.0.0.0", moved)
        assert env["FRESHREC_TRAINER_METRICS_PORT"] == "0"
        with pytest.raises(services.ServiceError, match=f"port {taken_api} .* in use"):
            claim_ports(env, "127.0.0.1", taken_api)
