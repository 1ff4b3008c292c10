#!/usr/bin/env bash
# Runs on every node of a `ray up` cluster (setup_commands), inside the Ray container.
# Installs Slicefleet and its CUDA dependencies unless the image already has this version, then fetches
# the model once. Idempotent: a second `ray up` is quick.
set -euo pipefail

SRC=${SLICEFLEET_SRC:-$HOME/slicefleet-src}
ENV_FILE=${SLICEFLEET_ENV_FILE:-$HOME/slicefleet.env}
TORCH_VERSION=${SLICEFLEET_TORCH_VERSION:-2.13.0}

if [ -f "$ENV_FILE" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  set +a
fi

# torch first, pinned: the PyPI wheel for Linux x86_64 is the CUDA build (it bundles the CUDA runtime);
# an unpinned torch pulled in by transformers or deepspeed could be another version.
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  pip install --quiet "torch==$TORCH_VERSION"
fi
# ninja: DeepSpeed builds its inference kernels (kernel injection) just in time with the image's nvcc.
python -c "import ninja" 2>/dev/null || pip install --quiet ninja

want=$(sed -n 's/^version = "\(.*\)"/\1/p' "$SRC/pyproject.toml")
have=$(python -c "import importlib.metadata as m; print(m.version('slicefleet'))" 2>/dev/null || true)
# With the length extra (the generation-length predictor the dispatcher orders by), held to the versions the
# tests pass with.
PIN=(-c "$SRC/constraints.txt")
if [ "${SLICEFLEET_FORCE_INSTALL:-0}" = 1 ]; then
  pip install --quiet "${PIN[@]}" "${SRC}[length]" && pip install --quiet --force-reinstall --no-deps "$SRC"
elif [ "$have" != "$want" ]; then
  pip install --quiet "${PIN[@]}" "${SRC}[length]"
fi
python -c "import cluster.config, balancer, worker, predictor"

mkdir -p "$HOME/slicefleet"
if [ -n "${SLICEFLEET_MODEL_REPO:-}" ] && [ ! -f "${SLICEFLEET_MODEL_PATH:?}/config.json" ]; then
  mkdir -p "$SLICEFLEET_MODEL_PATH"
  python - <<'PY'
import os
from huggingface_hub import snapshot_download
snapshot_download(os.environ["SLICEFLEET_MODEL_REPO"], local_dir=os.environ["SLICEFLEET_MODEL_PATH"],
                  token=os.environ.get("HF_TOKEN") or None)
PY
fi
