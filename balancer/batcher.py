"""SCLS's dynamic-programming batcher.

Sort the candidates by current input length and split them into contiguous runs. A run of n requests whose
longest input is L costs ``time.batch_time(n, L, steps)`` and needs ``memory.batch_bytes(n, L, steps)``; the DP
picks the split with the least total estimated time such that every run fits the memory budget and the
batch-size cap. Contiguity after sorting is what makes this tractable: a batch is padded to its longest
member, so mixing far-apart lengths only adds padding.

best[j] = min over s in 1..cap(L_j) of best[j - s] + cost(s, L_j)

The costs for every (j, s) come from one vectorised call to the estimator; the recurrence is then a short
loop per row.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from balancer.estimators import MemoryEstimator, SliceTimeEstimator
from balancer.types import Request


@dataclass
class BatchPlan:
    groups: list[list[Request]]
    """Contiguous runs of the length-sorted candidates, shortest inputs first."""
    total_time: float
    """Sum of the estimated times of the groups (the DP's objective)."""
    unfit: list[Request]
    """Requests whose single-row batch already exceeds the memory budget; they can never run here."""


def row_caps(lengths: np.ndarray, steps: int, memory: MemoryEstimator, max_batch_size: int) -> np.ndarray:
    """Largest batch allowed when the longest row has each of ``lengths`` tokens (memory and the cap)."""
    cache: dict[int, int] = {}
    caps = np.empty(len(lengths), dtype=np.int64)
    for i, length in enumerate(lengths.tolist()):
        cap = cache.get(length)
        if cap is None:
            cap = cache[length] = min(max_batch_size, memory.max_batch_size(length, steps))
        caps[i] = cap
    return caps


def plan_batches(requests: list[Request], steps: int, time: SliceTimeEstimator, memory: MemoryEstimator,
                 max_batch_size: int, kv_kept: bool = False) -> BatchPlan:
    """Split ``requests`` into batches of least total estimated time under the memory bound.

    ``kv_kept``: rows with a kept KV cache (``kv_replica`` set) resume by feeding one token, so only the
    fresh rows of a batch pay a prefill padded to their longest (the engines feed the two kinds apart).
    """
    ordered = sorted(requests, key=lambda r: (r.input_len, r.id))
    lengths = np.array([r.input_len for r in ordered], dtype=np.int64)
    caps = row_caps(lengths, steps, memory, max_batch_size)
    unfit = [r for r, c in zip(ordered, caps) if c < 1]
    if unfit:
        keep = caps >= 1
        ordered = [r for r, k in zip(ordered, keep) if k]
        lengths, caps = lengths[keep], caps[keep]
    n = len(ordered)
    if n == 0:
        return BatchPlan([], 0.0, unfit)

    width = int(min(caps.max(), n))
    sizes = np.arange(1, width + 1, dtype=np.int64)
    # cost[j][s-1]: a batch of s rows ending at sorted index j (its longest row), for every j at once. The
    # recurrence itself runs on Python lists: its windows are a few dozen wide, where NumPy's per-call
    # overhead costs more than the arithmetic.
    if kv_kept:
        fresh = np.array([r.kv_replica is None for r in ordered])
        cost = _costs_with_kept_caches(time, lengths, fresh, sizes, steps).tolist()
    else:
        cost = np.broadcast_to(np.asarray(time.batch_time(sizes[None, :], lengths[:, None], steps), dtype=float),
                               (n, width)).tolist()
    best, take = _least_total_splits(cost, np.minimum(caps, width).tolist())

    groups: list[list[Request]] = []
    j = n
    while j > 0:
        s = take[j]
        groups.append(ordered[j - s:j])
        j -= s
    groups.reverse()
    return BatchPlan(groups, best[n], unfit)


def _costs_with_kept_caches(time: SliceTimeEstimator, lengths: np.ndarray, fresh: np.ndarray, sizes: np.ndarray,
                            steps: int) -> np.ndarray:
    """cost[j, s-1] for the rows j-s+1..j (sorted by length) when only the fresh ones are prefilled in full.

    Decode runs every row at the longest context L_j. The fresh rows' prefill is padded to the longest fresh
    row in the window (the last one, the rows being sorted); resumed rows feed one token each.
    """
    n = len(lengths)
    end = np.arange(n)[:, None]
    start = np.maximum(end - sizes[None, :] + 1, 0)
    cum_fresh = np.concatenate([[0], np.cumsum(fresh)])
    n_fresh = cum_fresh[end + 1] - cum_fresh[start]
    n_resumed = sizes[None, :] - n_fresh
    last_fresh = np.maximum.accumulate(np.where(fresh, np.arange(n), -1))[end]
    fresh_len = np.where(last_fresh >= start, lengths[np.maximum(last_fresh, 0)], 0)
    longest = lengths[:, None].astype(float)
    decode = time.batch_time(sizes[None, :], longest, steps) - time.batch_time(sizes[None, :], longest, 0)
    prefill = (np.where(n_fresh > 0, time.batch_time(n_fresh, fresh_len, 0), 0.0)
               + np.where(n_resumed > 0, time.batch_time(n_resumed, 1, 0), 0.0))
    return np.asarray(decode + prefill, dtype=float)


def _least_total_splits(cost: list[list[float]], caps: list[int]) -> tuple[list[float], list[int]]:
    """best[j]: least total cost of the first j rows; take[j]: the size of the last batch in that split.

    best[j] = min over s in 1..min(caps[j-1], j) of best[j - s] + cost[j-1][s-1], the smallest s on ties.
    """
    n = len(cost)
    best = [0.0] * (n + 1)
    take = [0] * (n + 1)
    for j in range(1, n + 1):
        row = cost[j - 1]
        least, size = math.inf, 0
        for s in range(1, min(caps[j - 1], j) + 1):
            total = best[j - s] + row[s - 1]
            if total < least:
                least, size = total, s
        best[j], take[j] = least, size
    return best, take


def split_for_parallelism(groups: list[list[Request]], workers: int, cost) -> list[list[Request]]:
    """Halve the costliest splittable group until there are at least ``workers`` groups.

    The DP minimises total work, which can leave fewer batches than idle replicas; splitting then buys
    parallelism at a small cost in total work. ``cost(group)`` is the group's estimated time; each group is
    costed once (a heap), so a fleet of hundreds of idle replicas costs O(groups · log groups).
    """
    if len(groups) >= workers:
        return list(groups)
    # (-cost, tie-breaker, group); groups of one row cannot be split and stay aside.
    heap = [(-cost(g), i, g) for i, g in enumerate(groups) if len(g) > 1]
    done = [g for g in groups if len(g) <= 1]
    heapq.heapify(heap)
    counter = len(groups)
    while heap and len(heap) + len(done) < workers:
        _, _, biggest = heapq.heappop(heap)
        half = len(biggest) // 2
        for part in (biggest[:half], biggest[half:]):
            if len(part) > 1:
                heapq.heappush(heap, (-cost(part), counter, part))
            else:
                done.append(part)
            counter += 1
    out = done + [g for _, _, g in heap]
    # Keep the length order of the input (shortest inputs first), as the DP's groups have.
    return sorted(out, key=lambda g: (g[0].input_len, g[0].id))
