#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (CPU; GPU tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec python3 -m pytest -q "$@"
