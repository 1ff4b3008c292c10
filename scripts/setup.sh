#!/usr/bin/env bash
# Installs Slicefleet and everything it needs on a fresh machine. Idempotent: fast when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: an unpinned torch (asked for by transformers or deepspeed) pulls a multi-GB CUDA build.
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
if ! "$PY" -c 'import balancer, cluster, hypothesis, openai' 2>/dev/null \
   || [ pyproject.toml -nt .setup-done ]; then
  "$PY" -m pip install --quiet -e ".[test]"
  touch .setup-done
fi
# The Helm v4 library for tests/deploy (chart lint and render). It declares Python >= 3.12 but works on 3.11,
# so it cannot be a plain test extra; pinned because tests/deploy/helm_render.py relies on its Install result.
if ! "$PY" -c 'import helm_sdkpy' 2>/dev/null; then
  "$PY" -m pip install --quiet --ignore-requires-python "helm-sdkpy==0.1.32"
fi
