# Slicefleet on a Ray GPU image: the image behind configs/cluster-{aws,gcp}.yaml (docker.image) and the
# Helm chart in k8s/slicefleet (image.repository / image.tag).
#
#   docker build -t REGISTRY/slicefleet:0.1.0-gpu .
#   docker push REGISTRY/slicefleet:0.1.0-gpu
#
# The Ray base image is a CUDA *devel* image, so DeepSpeed can compile its inference kernels (kernel
# injection) with nvcc at first use. Checked in CI with hadolint (tests/deploy/test_dockerfile.py).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG NINJA_VERSION=1.13.2
# 1: build the small default model into the image (what the chart's default values serve).
ARG BUILD_DEFAULT_MODEL=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# redis-tools for health checks and debugging against the request-state Redis; redis-server for the
# `ray up` launchers, whose head node can run that Redis itself (configs/launcher/start-head.sh).
USER 0
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/*
# The Ray image's own user: ray, uid 1000, group users (100).
USER 1000:100

# torch first and pinned: the PyPI wheel for Linux x86_64 is the CUDA build. An unpinned torch pulled in
# by transformers or deepspeed could resolve to another version.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "ninja==${NINJA_VERSION}"

WORKDIR /home/ray/slicefleet-src
COPY --chown=1000:100 . .
RUN pip install --no-cache-dir . \
    && python -c "import cluster.config, balancer, predictor, worker"

# (TOKENIZERS_PARALLELISM is the tokenizers library's thread switch, not a secret.)
# hadolint ignore=DL3064
ENV SLICEFLEET_MODEL_DIR=/home/ray/slicefleet-models/tiny-llama \
    TOKENIZERS_PARALLELISM=false
RUN if [ "${BUILD_DEFAULT_MODEL}" = "1" ]; then slicefleet make-model; fi

# 8000: the OpenAI-compatible API (Ray Serve's HTTP proxy); 8265: Ray dashboard; 6379: Ray GCS;
# 8080: Ray's Prometheus metrics.
EXPOSE 8000 8265 6379 8080
WORKDIR /home/ray
