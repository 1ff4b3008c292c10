"""``build_engine``: the one place the cluster, the profiler and the benchmarks get an engine from."""

from __future__ import annotations

from pathlib import Path

BACKENDS = ("hf", "deepspeed", "continuous")


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
):
    """Load ``model_path`` (default: the default model, built if missing) behind the chosen backend.

    - ``hf``: :class:`worker.hf_engine.HFEngine` (slice engine, ``run_slice``);
    - ``deepspeed``: :class:`worker.deepspeed_engine.DeepSpeedEngine` (slice engine; kernel injection on
      CUDA unless ``kernel_inject=False``);
    - ``continuous``: :class:`worker.continuous.ContinuousBatchingEngine` (``add``/``step``, ILS baseline).

    On CPU, torch's thread count is pinned (``num_threads``, default ``$SLICEFLEET_TORCH_THREADS`` or 1):
    replicas share few cores and oversubscribed OpenMP threads slow everything down many times.
    """
    from worker.hf_engine import DEFAULT_KV_BUDGET_BYTES, load_model, set_cpu_threads
    from worker.make_model import ensure_default_model

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
    if device == "cpu":
        set_cpu_threads(num_threads)
    path = Path(model_path) if model_path is not None else ensure_default_model()
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
