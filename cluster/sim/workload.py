"""Requests for the simulator: lengths, true output lengths, arrival times, predicted lengths."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Sequence, TypeVar

import numpy as np

from cluster.sim.gc_pause import gc_paused

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimRequest:
    id: str
    prompt_len: int
    output_len: int
    """The true output length: the simulated engine emits EOS after exactly this many tokens."""
    arrival: float
    predicted_len: float | None = None


def arrival_times(n: int, rate: float | None, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Arrival times of ``n`` requests.

    ``rate`` None or inf: all at t = 0. Otherwise gamma-distributed gaps with mean 1/rate and shape
    ``burstiness`` (vLLM's convention): 1 is a Poisson process, below 1 is burstier, above 1 is smoother.
    """
    if n <= 0:
        return np.zeros(0)
    if rate is None or math.isinf(rate):
        return np.zeros(n)
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got rate={rate}, burstiness={burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """ShareGPT-like (prompt, output) lengths without the data set: log-normal, clipped to vLLM's rules.

    For unit tests of the simulator only; benchmarks and the CLI use the real ShareGPT sample.
    """
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(4.6, 1.0, n), 4, 1024).astype(int)
    outputs = np.clip(rng.lognormal(5.2, 0.9, n), 4, 2048 - prompts).astype(int)
    return list(zip(prompts.tolist(), outputs.tolist()))


T = TypeVar("T")


def oversample(items: Sequence[T], n: int, seed: int = 0) -> list[T]:
    """``n`` requests out of ``items``: all of them, then ``n - len(items)`` more drawn with replacement, as
    vLLM's benchmark datasets oversample. A drawn copy gets the id ``<id>#<k>`` so ids stay unique (the
    simulator and the load generator key requests by id). ``items`` must be dataclasses with an ``id``.

    Fewer than ``n`` come back only when ``items`` is empty. ``n`` at most ``len(items)``: the first ``n``.
    """
    out = list(items[:n])
    if len(out) >= n or not out:
        return out
    rng = random.Random(seed)
    for k in range(1, n - len(items) + 1):
        item = rng.choice(items)
        out.append(replace(item, id=f"{item.id}#{k}"))
    return out


def sharegpt_sample(tokenizer, n: int, seed: int, conversations=None, allow_oversample: bool = True) -> tuple[list, int]:
    """Exactly ``n`` ShareGPT requests (vLLM's filter and order), oversampled beyond what passes the filter,
    and how many of them are drawn again; a SystemExit saying how many pass when oversampling is not allowed."""
    from predictor.sharegpt import sample_requests

    if n < 1:  # an empty run would print a table of zeros as if it had measured something
        raise SystemExit(f"the request count must be at least 1, got {n}")
    sample = sample_requests(tokenizer, n, seed=seed, conversations=conversations)
    if len(sample) >= n:
        return sample, 0
    if not allow_oversample or not sample:
        raise SystemExit(f"only {len(sample)} ShareGPT requests pass the filter, {n} were asked for: ask for at most "
                         f"{len(sample)}, or drop --no-oversample to draw the rest again with replacement")
    log.warning("only %d ShareGPT requests pass the filter: drawing %d of them again (with replacement, seeded) "
                "to make %d", len(sample), n - len(sample), n)
    return oversample(sample, n, seed), n - len(sample)


Predictor = Callable[[Sequence[tuple[int, int]]], Sequence[float]]
"""Maps (prompt_len, true output_len) pairs to predicted output lengths (the simulator's pluggable predictor)."""


def oracle_predictor(pairs: Sequence[tuple[int, int]]) -> list[float]:
    return [float(out) for _, out in pairs]


def constant_predictor(value: float) -> Predictor:
    return lambda pairs: [float(value)] * len(pairs)


def build_workload(pairs: Sequence[tuple[int, int]], arrivals: np.ndarray, predicted: Sequence[float] | None = None,
                   ids: Sequence[str] | None = None) -> list[SimRequest]:
    if len(arrivals) != len(pairs):
        raise ValueError("need one arrival time per request")
    predicted = predicted if predicted is not None else [None] * len(pairs)
    with gc_paused():  # a million requests
        ids = ids if ids is not None else [f"r{i}" for i in range(len(pairs))]
        # (tolist: a Python float from each NumPy element one by one costs a call per request)
        times = arrivals.tolist() if isinstance(arrivals, np.ndarray) else arrivals
        return [SimRequest(rid, int(p), int(o), float(t), None if pr is None else float(pr))
                for rid, (p, o), t, pr in zip(ids, pairs, times, predicted)]
