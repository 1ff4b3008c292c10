#!/usr/bin/env bash
# Starts Ray on a GPU worker of a `ray up` cluster (worker_start_ray_commands).
# RAY_HEAD_IP is set by the cluster launcher. The request-state Redis is the head's unless
# SLICEFLEET_REDIS_URL in slicefleet.env names another one.
set -euo pipefail

ENV_FILE=${SLICEFLEET_ENV_FILE:-$HOME/slicefleet.env}
set -a
# shellcheck disable=SC1090
. "$ENV_FILE"
set +a
: "${RAY_HEAD_IP:?RAY_HEAD_IP is set by ray up}"
if [ -z "${SLICEFLEET_REDIS_URL:-}" ]; then
  export SLICEFLEET_REDIS_URL="redis://$RAY_HEAD_IP:${SLICEFLEET_REDIS_PORT:-6380}/0"
fi

ulimit -n 65536
ray start --address="$RAY_HEAD_IP:6379" --object-manager-port=8076 --metrics-export-port=8080
