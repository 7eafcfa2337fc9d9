#!/usr/bin/env bash
# Create .venv (once) and install freshrec with its test and benchmark extras.
# torch==2.13.0 goes first: a bare `torch` requirement on a clean environment pulls a
# multi-GB CUDA build, while this pinned CPU build is what the project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.freshrec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing torch==2.13.0 and freshrec[dev,bench,ann,durable] (a few minutes the first time)"
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
  python -m pip install -q -e '.[dev,bench,ann,durable]' 2>&1 | grep -v '^WARNING: Location' || true
  python -c "import torch, transformers, kafka, fastapi, redis, river" \
    || { echo "setup: installation failed" >&2; exit 1; }
  touch "$stamp"
fi
