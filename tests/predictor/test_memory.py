"""KV bytes per token from a config must match what a real forward pass allocates."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from balancer.estimators import LinearKVMemory  # noqa: E402
from predictor.memory import (  # noqa: E402
    dtype_bytes,
    kv_budget_bytes,
    kv_bytes_per_token,
    kv_shape,
    measured_cache_bytes,
    memory_estimator,
)


def _run_slice(model, n, length, steps):
    cache = DynamicCache(config=model.config)
    ids = torch.randint(3, model.config.vocab_size, (n, length))
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("kv_heads,dtype", [(4, torch.float32), (2, torch.float32), (1, torch.bfloat16)])
def test_estimate_within_5_percent_of_real_dynamic_cache(kv_heads, dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    n, length, steps = 3, 37, 9
    cache = _run_slice(model, n, length, steps)
    real = measured_cache_bytes(cache)
    est = memory_estimator(model.config, dtype=dtype, budget_bytes=1 << 30)
    predicted = est.batch_bytes(n, length, steps)
    assert real > 0
    assert abs(predicted - real) / real <= 0.05, (predicted, real)
    # The formula itself, for the record: 2 (K,V) x layers x kv_heads x head_dim x bytes.
    assert kv_bytes_per_token(model.config, dtype) == 2 * 3 * kv_heads * 16 * dtype_bytes(dtype)


def test_default_model_shapes_within_5_percent(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    cache = _run_slice(model, 2, 20, 4)
    est = memory_estimator(model.config)
    assert abs(est.batch_bytes(2, 20, 4) - measured_cache_bytes(cache)) <= 0.05 * measured_cache_bytes(cache)


def test_config_variants():
    # GQA read from num_key_value_heads; head_dim derived from hidden/heads when absent; dict configs work.
    s = kv_shape({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 256, "dtype": "bfloat16"})
    assert (s.layers, s.kv_heads, s.head_dim, s.dtype_bytes) == (2, 8, 32, 2)
    s = kv_shape({"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                  "hidden_size": 256, "head_dim": 64})
    assert (s.kv_heads, s.head_dim, s.dtype_bytes) == (2, 64, 4)
    with pytest.raises(ValueError):
        dtype_bytes("complex-nonsense")


def test_budget_and_max_batch_size():
    est = memory_estimator({"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8},
                           budget_bytes=64 * 100)
    assert isinstance(est, LinearKVMemory)
    assert est.bytes_per_token == 64
    assert est.max_batch_size(90, 10) == 1
    assert est.max_batch_size(40, 10) == 2
    assert est.batch_bytes(2, 40, 10) <= est.budget_bytes < est.batch_bytes(3, 40, 10)
    assert kv_budget_bytes("cpu", cpu_default=123.0) == 123.0
    assert kv_budget_bytes("cpu", budget_bytes=5) == 5.0
    with pytest.raises(ValueError):
        kv_budget_bytes("cpu", safety=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_budget_is_free_memory_times_safety():
    free, _ = torch.cuda.mem_get_info()
    assert kv_budget_bytes("cuda", safety=0.5) == pytest.approx(free * 0.5, rel=0.05)
