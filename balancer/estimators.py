"""What the scheduler needs to know ahead of time, as small protocols, plus SCLS's closed-form latency model.

``predictor/`` fits and serves real implementations; tests pass simple ones. Everything here is plain
arithmetic so that the same model drives the live dispatcher and the simulator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SliceTimeEstimator(Protocol):
    """Estimated serving time of one batch."""

    def batch_time(self, n, max_input_len: int, steps: int):
        """Seconds to prefill ``n`` rows padded to ``max_input_len`` and run ``steps`` decode steps.

        ``n`` and ``max_input_len`` may be ints or NumPy arrays that broadcast together (the DP batcher
        evaluates every size for every length in one call); the result has the broadcast shape.
        """


@runtime_checkable
class MemoryEstimator(Protocol):
    """KV-cache memory of one batch against a replica's budget."""

    def batch_bytes(self, n: int, max_input_len: int, steps: int) -> float:
        """Peak KV-cache bytes for ``n`` rows of ``max_input_len`` tokens growing by ``steps``."""

    def max_batch_size(self, max_input_len: int, steps: int) -> int:
        """Largest ``n`` whose ``batch_bytes`` fits the budget (0 if not even one row fits)."""


@runtime_checkable
class LengthPredictor(Protocol):
    """Predicted total output length of requests, from their prompts."""

    def predict(self, prompts: list[str], prompt_lens: list[int]) -> list[float]: ...


_KEPT_SHAPES = 1 << 18
"""Most single-shape estimates a model keeps (about 40 MB); past it they are forgotten and asked afresh."""


@dataclass(frozen=True)
class BilinearLatencyModel:
    """SCLS's serving-time form, evaluated in closed form.

    prefill(N, L) = a·N·L + b·N + c·L + d   (N rows padded to L tokens)
    decode(N, l)  = e·N·l + f·N + g·l + h   (one step at context length l)

    A slice of s steps after a prefill of length L costs prefill(N, L) + Σ_{j<s} decode(N, L + j), and the
    sum has a closed form, so estimating a batch is O(1) however long the slice.
    """

    a: float
    b: float
    c: float
    d: float
    e: float
    f: float
    g: float
    h: float

    def __post_init__(self) -> None:
        # Single-shape estimates, kept: a simulated run asks for the same few hundred thousand shapes millions
        # of times. The model is immutable, so they never go stale. Not a field: equality, hashing, repr and
        # as_dict ignore it.
        object.__setattr__(self, "_kept", {})

    def prefill_time(self, n, length):
        return self.a * n * length + self.b * n + self.c * length + self.d

    def decode_step_time(self, n, context_len):
        return self.e * n * context_len + self.f * n + self.g * context_len + self.h

    def batch_time(self, n, max_input_len: int, steps: int):
        if type(n) is int and type(max_input_len) is int:  # one shape (not arrays): look it up first
            key = (n, max_input_len, steps)
            kept = self._kept.get(key)
            if kept is None:
                if len(self._kept) >= _KEPT_SHAPES:
                    self._kept.clear()
                kept = self._kept[key] = self._batch_time(n, max_input_len, steps)
            return kept
        return self._batch_time(n, max_input_len, steps)

    def _batch_time(self, n, max_input_len: int, steps: int):
        # n and max_input_len broadcast (the DP batcher passes a column of lengths and a row of sizes). Every
        # product below has a float coefficient, so ints and integer arrays need no conversion; lists do.
        if isinstance(n, (list, tuple)):
            n = np.asarray(n, dtype=float)
        length = np.asarray(max_input_len, dtype=float) if isinstance(max_input_len, (list, tuple)) else max_input_len
        s = float(steps) if steps > 0 else 0.0
        # Σ_{j<s} (L + j) = s·L + s(s-1)/2
        context_sum = s * length + s * (s - 1.0) / 2.0
        decode = self.e * n * context_sum + self.f * n * s + self.g * context_sum + self.h * s
        return self.prefill_time(n, length) + decode

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class LinearKVMemory:
    """KV memory that grows linearly with tokens: bytes = n · (L + steps) · bytes_per_token.

    ``budget_bytes`` is what one replica may spend on KV cache (after weights and a safety factor).
    """

    bytes_per_token: float
    budget_bytes: float

    def batch_bytes(self, n: int, max_input_len: int, steps: int) -> float:
        return float(n) * (max_input_len + steps) * self.bytes_per_token

    def max_batch_size(self, max_input_len: int, steps: int) -> int:
        per_row = (max_input_len + steps) * self.bytes_per_token
        return int(self.budget_bytes // per_row) if per_row > 0 else 1 << 30
