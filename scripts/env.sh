# Environment every Slicefleet process wants on this kind of machine (sourced by scripts/*.sh).
# Keep every Ray socket on 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Keep grown KV tensors in the allocator instead of returning them to the kernel each step (2x on CPU).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184}
# No model hub is reachable: never try.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TOKENIZERS_PARALLELISM=false
