"""KV-cache memory per token and per batch, from a model's config and a replica's budget.

Why: SCLS bounds a batch's memory by N · (L + S) · kv_bytes_per_token and forms the largest batch that fits,
so the bytes per token must be right (too low: OOM; too high: small batches and lost throughput). The cache
a decoder keeps is, per layer, one K and one V tensor of shape (batch, kv_heads, tokens, head_dim), so

    kv_bytes_per_token = 2 · layers · kv_heads · head_dim · bytes(dtype)

which counts grouped-query attention (``num_key_value_heads``) correctly. The budget is what the replica
may spend on that cache: on a GPU, the free memory after the weights are loaded times a safety factor (the
rest is activations, allocator slack and the CUDA context); on CPU, a configured number of bytes.

The result is the balancer's own :class:`~balancer.estimators.LinearKVMemory`, so the live dispatcher and
the simulator share one formula.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from balancer.estimators import LinearKVMemory

log = logging.getLogger(__name__)

DEFAULT_CPU_BUDGET_BYTES = 2 * 1024**3
"""CPU replicas have no device memory to ask about; 2 GiB matches ``engine.kv_budget_bytes``' default."""

DEFAULT_SAFETY = 0.8

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2,
    "bfloat16": 2, "bf16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "int8": 1, "uint8": 1,
    "float64": 8, "double": 8,
}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype, a NumPy dtype or a name like ``"bfloat16"``."""
    if dtype is None:
        return 4
    itemsize = getattr(dtype, "itemsize", None)  # torch.dtype and numpy.dtype both have it
    if isinstance(itemsize, int):
        return itemsize
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


@dataclass(frozen=True)
class KVShape:
    """What the KV cache of one token is made of."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def kv_shape(config, dtype: Any = None) -> KVShape:
    """Read layers, KV heads and head dim from a transformers config (or a dict of its fields).

    ``dtype`` overrides the config's own ``dtype``/``torch_dtype`` (what the engine actually loads).
    Nested configs (multimodal models) are read through their ``text_config``.
    """
    if isinstance(config, dict):
        from types import SimpleNamespace

        config = SimpleNamespace(**config)
    text = getattr(config, "text_config", None)
    if text is not None and getattr(text, "num_hidden_layers", None):
        config = text

    def first(*names, default=None):
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return default

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    if layers is None or heads is None:
        raise ValueError("config lacks num_hidden_layers / num_attention_heads")
    kv_heads = first("num_key_value_heads", "n_kv_heads", "multi_query_group_num", default=heads)
    if getattr(config, "multi_query", False):
        kv_heads = 1
    head_dim = first("head_dim")
    if head_dim is None:
        hidden = first("hidden_size", "n_embd", "d_model")
        head_dim = int(hidden) // int(heads)
    if dtype is None:
        dtype = first("dtype", "torch_dtype", default="float32")
    return KVShape(int(layers), int(kv_heads), int(head_dim), dtype_bytes(dtype))


def kv_bytes_per_token(config, dtype: Any = None) -> int:
    """KV-cache bytes one token occupies across all layers (K and V)."""
    return kv_shape(config, dtype).bytes_per_token


def kv_budget_bytes(
    device: str = "cpu",
    budget_bytes: float | None = None,
    safety: float = DEFAULT_SAFETY,
    cpu_default: float = DEFAULT_CPU_BUDGET_BYTES,
) -> float:
    """Bytes a replica may give to KV cache.

    An explicit ``budget_bytes`` wins. On CUDA: free device memory *now* (call it after the weights are
    loaded) times ``safety``. On CPU: ``cpu_default``.
    """
    if budget_bytes is not None:
        return float(budget_bytes)
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    if str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return float(free) * safety
    return float(cpu_default)


def memory_estimator(
    config,
    *,
    dtype: Any = None,
    device: str = "cpu",
    budget_bytes: float | None = None,
    safety: float = DEFAULT_SAFETY,
) -> LinearKVMemory:
    """A balancer ``MemoryEstimator`` for a model on a replica: bytes per token from the config, budget
    from :func:`kv_budget_bytes`."""
    per_token = kv_bytes_per_token(config, dtype)
    budget = kv_budget_bytes(device, budget_bytes, safety)
    log.info("KV cache: %d bytes/token, budget %.1f MiB on %s", per_token, budget / 2**20, device)
    return LinearKVMemory(bytes_per_token=float(per_token), budget_bytes=budget)


def measured_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's K/V tensors (DynamicCache or a legacy tuple of tuples)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total
    for pair in cache:
        for t in pair:
            total += t.numel() * t.element_size()
    return total
