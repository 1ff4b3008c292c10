#!/usr/bin/env bash
# Starts Ray's head on a `ray up` cluster (head_start_ray_commands), after the request-state Redis.
#
# SLICEFLEET_REDIS_URL empty: a Redis runs here on port 6380 (never Ray's 6379), with a password and AOF
# persistence under ~/slicefleet/redis (a host directory: it survives container restarts). Set the URL in
# slicefleet.env to use a managed Redis instead. Either way it is not the Redis of Ray's GCS fault tolerance.
set -euo pipefail

ENV_FILE=${SLICEFLEET_ENV_FILE:-$HOME/slicefleet.env}
set -a
# shellcheck disable=SC1090
. "$ENV_FILE"
set +a
: "${SLICEFLEET_REDIS_PASSWORD:?set SLICEFLEET_REDIS_PASSWORD in slicefleet.env}"
REDIS_PORT=${SLICEFLEET_REDIS_PORT:-6380}

if [ -z "${SLICEFLEET_REDIS_URL:-}" ]; then
  data=$HOME/slicefleet/redis
  mkdir -p "$data"
  if ! REDISCLI_AUTH=$SLICEFLEET_REDIS_PASSWORD redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    # The password goes into a 0600 config file, not onto the command line (where ps would show it).
    conf=$data/redis.conf
    (
      umask 077
      cat >"$conf" <<CONF
port $REDIS_PORT
bind 0.0.0.0
requirepass $SLICEFLEET_REDIS_PASSWORD
dir $data
appendonly yes
appendfsync everysec
daemonize yes
logfile $data/redis.log
CONF
    )
    redis-server "$conf"
  fi
  head_ip=$(hostname -I | awk '{print $1}')
  export SLICEFLEET_REDIS_URL="redis://$head_ip:$REDIS_PORT/0"
fi

ulimit -n 65536
ray start --head --port=6379 --object-manager-port=8076 \
  --autoscaling-config="$HOME/ray_bootstrap_config.yaml" \
  --dashboard-host=0.0.0.0 --metrics-export-port=8080
