"""`freshrec bench` without the bench extra says which extra to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from freshrec import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("which", ["quality", "live"])
def test_bench_without_the_extra_names_the_extra(
    which: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules: importing it fails as if the package were not installed
    monkeypatch.setitem(sys.modules, "implicit", None)
    monkeypatch.delitem(sys.modules, "bench.quality", raising=False)
    assert cli.main(["bench", which]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[bench]'" in err and "missing: implicit" in err


def test_a_late_missing_module_of_the_extra_gets_the_same_message() -> None:
    """The early check passes but an import inside the benchmark fails: same message. In a
    fresh interpreter, so that no module an earlier test imported hides the failing import."""
    import subprocess

    script = ("import sys\n"
              "sys.modules['scipy'] = sys.modules['scipy.sparse'] = None  # not installed\n"
              "from freshrec import cli\n"
              "cli.missing_bench_modules = lambda: []  # the early check passes\n"
              "sys.exit(cli.main(['bench', 'quality', '--help-not-reached']))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "'bench' extra" in done.stderr


def test_the_extra_names_what_pyproject_declares() -> None:
    from pathlib import Path

    import tomllib

    extra = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = " ".join(extra["project"]["optional-dependencies"]["bench"])
    for module in cli.BENCH_EXTRA_MODULES:
        assert module in declared, module


def test_sigterm_during_a_benchmark_runs_its_cleanup(tmp_path) -> None:
    """A benchmark stops the processes it started in `finally`; SIGTERM must reach it."""
    import subprocess

    script = ("import os, signal, sys, time\n"
              "from freshrec.cli import exit_on_sigterm\n"
              "exit_on_sigterm()\n"
              "try:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "finally:\n"
              "    open(sys.argv[1], 'w').write('stopped')\n")
    marker = tmp_path / "cleanup"
    done = subprocess.run([sys.executable, "-c", script, str(marker)], cwd=ROOT, timeout=60)
    assert done.returncode == 143
    assert marker.read_text() == "stopped"


def test_bench_help_is_the_benchmarks_own(capsys: pytest.CaptureFixture[str]) -> None:
    """`freshrec bench serving --help` listed only the four benchmark names: the options
    (`--items`, `--quick`, ...) were out of reach from the command the issues quote."""
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "serving", "--help"])
    assert done.value.code == 0
    assert "--items" in capsys.readouterr().out
    assert cli.main(["bench", "--help"]) == 0
    assert "quality,live,serving,chaos" in capsys.readouterr().out
