"""Simple estimators and request factories for the balancer's tests."""

from __future__ import annotations

from hypothesis import strategies as st

from balancer.estimators import BilinearLatencyModel, LinearKVMemory
from balancer.types import Request

LATENCY = BilinearLatencyModel(a=1e-5, b=2e-4, c=1e-5, d=5e-3, e=1e-7, f=3e-4, g=1e-7, h=2e-3)

coef = st.floats(min_value=0.0, max_value=1e-2, allow_nan=False)
models = st.builds(BilinearLatencyModel, coef, coef, coef, coef, coef, coef, coef, coef)
"""Latency models with random non-negative coefficients (hypothesis)."""


def memory(budget_tokens: int, bytes_per_token: float = 1.0) -> LinearKVMemory:
    return LinearKVMemory(bytes_per_token=bytes_per_token, budget_bytes=budget_tokens * bytes_per_token)


def request(i: int, prompt_len: int = 10, max_tokens: int = 100, arrival: float = 0.0,
            predicted: float | None = None, generated: int = 0) -> Request:
    return Request(f"r{i}", prompt_len, max_tokens, arrival, predicted_len=predicted, generated=generated)
