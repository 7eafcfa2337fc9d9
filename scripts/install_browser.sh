#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver for the status-page browser test
# (tests/test_status_page.py). Safe to run again: does nothing when both are on PATH.
# Never fails the caller: without a browser that one test is skipped, and this says why.
#
#   scripts/install_browser.sh
set -uo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_browser: not root and no sudo; the browser test will be skipped" >&2
    exit 0
  fi
  sudo="sudo"
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get here; the browser test will be skipped" >&2
  exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "installing Debian packages chromium and chromium-driver (for the status-page test)"
if ! { $sudo apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
         chromium chromium-driver; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "install_browser: installation failed; the browser test will be skipped" >&2
fi
exit 0
