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
# Opt-in: SLICEFLEET_WITH_VLLM=1 also builds the separate vLLM venv (runs/vllm-venv, about 3 minutes) that the
# "vllm" engine backend (worker/vllm_engine.py) and the vLLM peer benchmark run; skipped when it already imports.
if [ "${SLICEFLEET_WITH_VLLM:-0}" = "1" ]; then
  if ! VLLM_CPU_NUM_OF_RESERVED_CPU=0 runs/vllm-venv/bin/python -c 'import vllm' 2>/dev/null; then
    bash bench/vllm_setup.sh
  fi
fi
