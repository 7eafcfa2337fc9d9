#!/bin/sh
# Entrypoint wrapper for the official Redis image (docker-compose service "redis"):
# renders deploy/redis/users.acl.template into an ACL file, then execs the given command
# (docker-entrypoint.sh redis-server --aclfile ...).
#
# Why a template and not plain `--user` arguments: arguments show up in `ps` and in
# `docker inspect`; here only SHA-256 hashes reach the rendered file, which lives on a tmpfs.
set -eu

template=${ACL_TEMPLATE:-/usr/local/etc/redis/users.acl.template}
out=${ACL_FILE:-/run/freshrec/users.acl}
ns=${FRESHREC_NAMESPACE:-freshrec}

# Same rule as protocol/settings.py, and it keeps sed's replacement text safe.
case $ns in
  "" | *[!A-Za-z0-9_.-]*) echo "render-acl: FRESHREC_NAMESPACE must match [A-Za-z0-9_.-]+" >&2; exit 1 ;;
esac

sha256() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

need() {  # need <name> <value>: refuse to start Redis with a missing or short password
  if [ "${#2}" -lt 16 ]; then
    echo "render-acl: $1 must be set to at least 16 characters (see .env.example)" >&2
    exit 1
  fi
}
need REDIS_TRAINER_PASSWORD "${REDIS_TRAINER_PASSWORD:-}"
need REDIS_FEATURES_PASSWORD "${REDIS_FEATURES_PASSWORD:-}"
need REDIS_API_PASSWORD "${REDIS_API_PASSWORD:-}"

mkdir -p "$(dirname "$out")"
umask 077
# Redis rejects comment lines in an ACL file, so the template's comments are dropped here.
sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' \
    -e "s/@NS@/$ns/g" \
    -e "s/@TRAINER_SHA256@/$(sha256 "$REDIS_TRAINER_PASSWORD")/" \
    -e "s/@FEATURES_SHA256@/$(sha256 "$REDIS_FEATURES_PASSWORD")/" \
    -e "s/@API_SHA256@/$(sha256 "$REDIS_API_PASSWORD")/" \
    "$template" > "$out"
# The image's docker-entrypoint.sh drops to the "redis" user, which must be able to read it.
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
  chown redis "$out"
fi

exec "$@"
