"""Simple estimators and request factories for the balancer's tests."""

from __future__ import annotations

from balancer.estimators import BilinearLatencyModel, LinearKVMemory
from balancer.types import Request

LATENCY = BilinearLatencyModel(a=1e-5, b=2e-4, c=1e-5, d=5e-3, e=1e-7, f=3e-4, g=1e-7, h=2e-3)


def memory(budget_tokens: int, bytes_per_token: float = 1.0) -> LinearKVMemory:
    return LinearKVMemory(bytes_per_token=bytes_per_token, budget_bytes=budget_tokens * bytes_per_token)


def request(i: int, prompt_len: int = 10, max_tokens: int = 100, arrival: float = 0.0,
            predicted: float | None = None, generated: int = 0) -> Request:
    return Request(f"r{i}", prompt_len, max_tokens, arrival, predicted_len=predicted, generated=generated)
