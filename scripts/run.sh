#!/usr/bin/env bash
# Installs what is missing, then starts the embedded default cluster: local Ray on loopback, a private
# Redis-protocol server, the small default model, 2 worker replicas. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec slicefleet serve "$@"
