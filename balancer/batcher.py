"""SCLS's dynamic-programming batcher.

Sort the candidates by current input length and split them into contiguous runs. A run of n requests whose
longest input is L costs ``time.batch_time(n, L, steps)`` and needs ``memory.batch_bytes(n, L, steps)``; the DP
picks the split with the least total estimated time such that every run fits the memory budget and the
batch-size cap. Contiguity after sorting is what makes this tractable: a batch is padded to its longest
member, so mixing far-apart lengths only adds padding.

best[j] = min over s in 1..cap(L_j) of best[j - s] + cost(s, L_j)

The costs for every (j, s) come from one vectorised call to the estimator, or, when the scheduler keeps a
``ShapeCosts`` across rounds, from tables per length computed once. The recurrence itself is compiled
(:mod:`balancer.splits`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from balancer.estimators import BilinearLatencyModel, LinearKVMemory, MemoryEstimator, SliceTimeEstimator
from balancer.splits import least_total_splits, least_total_splits_kept
from balancer.types import Request


@dataclass
class BatchPlan:
    groups: list[list[Request]]
    """Contiguous runs of the length-sorted candidates, shortest inputs first."""
    total_time: float
    """Sum of the estimated times of the groups (the DP's objective)."""
    unfit: list[Request]
    """Requests whose single-row batch already exceeds the memory budget; they can never run here."""


class _ByLength(dict):
    """length -> ``compute(length)``, computed on first use (a known length is a plain subscript)."""

    def __init__(self, compute):
        super().__init__()
        self._compute = compute

    def __missing__(self, length: int):
        value = self[length] = self._compute(length)
        return value


def _caps_by_length(memory: MemoryEstimator, steps: int, max_batch_size: int) -> _ByLength:
    """length L -> the largest batch allowed when its longest row has L tokens (memory and the size cap)."""
    return _ByLength(lambda length: min(max_batch_size, memory.max_batch_size(length, steps)))


class ShapeCosts:
    """What the DP asks of the estimators, asked once per shape and kept: for one slice length, the row cap
    of each longest input, and per-length tables of batch costs over every batch size.

    Rounds of a long run see the same few thousand input lengths again and again, and a cost matrix built
    afresh each round was a quarter of the simulator's time. The tables are computed by the same estimator
    call on a NumPy column as a fresh matrix would be, so the DP sees bit-identical costs. Keep one only while
    the estimators are pure functions of the shape: see ``cacheable``.
    """

    def __init__(self, time: SliceTimeEstimator, memory: MemoryEstimator, steps: int, max_batch_size: int):
        self.time, self.memory, self.steps, self.max_batch_size = time, memory, steps, max_batch_size
        self._sizes = np.arange(1, max_batch_size + 1, dtype=np.int64)
        self.cap = _caps_by_length(memory, steps, max_batch_size)
        """Largest batch allowed when its longest row has L tokens (memory and the size cap)."""
        self._tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def tables(self, longest: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every length L up to ``longest`` at once: ``whole[L, s - 1]`` (s rows padded to L, prefill and
        decode), ``decode[L, s - 1]`` (the decode steps alone of s rows from context L) and ``prefill[L, k]``
        (k rows prefilled padded to L; 0.0 for none)."""
        if self._tables is None or len(self._tables[0]) <= longest:
            top = max(2 * longest, 4096)  # room to grow: rounds see a few thousand lengths, rebuilt rarely
            column = np.arange(top + 1, dtype=float)[:, None]
            sizes = self._sizes[None, :]
            whole = np.asarray(self.time.batch_time(sizes, column, self.steps), dtype=float)
            decode = np.asarray(whole - self.time.batch_time(sizes, column, 0), dtype=float)
            prefill = np.zeros((top + 1, self.max_batch_size + 1))
            prefill[:, 1:] = np.asarray(self.time.batch_time(sizes, column, 0), dtype=float)
            self._tables = whole, decode, prefill
        return self._tables

    @staticmethod
    def cacheable(time: SliceTimeEstimator, memory: MemoryEstimator) -> bool:
        """Whether the estimators always answer the same for the same shape (frozen, closed form). The live
        dispatcher's online latency estimator refits itself between rounds, so it is not."""
        return type(time) is BilinearLatencyModel and type(memory) is LinearKVMemory

    def matches(self, time: SliceTimeEstimator, memory: MemoryEstimator, steps: int, max_batch_size: int) -> bool:
        return (self.time is time and self.memory is memory and self.steps == steps
                and self.max_batch_size == max_batch_size)


def plan_batches(requests: list[Request], steps: int, time: SliceTimeEstimator, memory: MemoryEstimator,
                 max_batch_size: int, kv_kept: bool = False, costs: ShapeCosts | None = None) -> BatchPlan:
    """Split ``requests`` into batches of least total estimated time under the memory bound.

    ``kv_kept``: rows with a kept KV cache (``kv_replica`` set) resume by feeding one token, so only the
    fresh rows of a batch pay a prefill padded to their longest (the engines feed the two kinds apart).
    ``costs``: the per-shape costs kept from earlier rounds (same ``time``, ``memory``, ``steps`` and
    ``max_batch_size``); without it the costs are computed afresh as one matrix. Both give the same plan.
    """
    # (input_len spelled out: the property's call was a third of this sort, which sees every row of every round)
    ordered = sorted(requests, key=lambda r: (r.prompt_len + r.generated, r.id))
    lengths = [r.prompt_len + r.generated for r in ordered]
    cap = costs.cap if costs is not None else _caps_by_length(memory, steps, max_batch_size)
    caps = np.array([cap[length] for length in lengths], dtype=np.int64)
    lengths = np.array(lengths, dtype=np.int64)
    unfit = [r for r, c in zip(ordered, caps.tolist()) if c < 1] if caps.min(initial=1) < 1 else []
    if unfit:
        keep = caps >= 1
        ordered = [r for r, k in zip(ordered, keep) if k]
        lengths, caps = lengths[keep], caps[keep]
    n = len(ordered)
    if n == 0:
        return BatchPlan([], 0.0, unfit)
    if costs is not None:
        whole, decode, prefill = costs.tables(int(lengths[-1]))  # sorted: the last length is the longest
        if kv_kept:
            fresh = np.fromiter((r.kv_replica is None for r in ordered), dtype=bool, count=n)
            return _groups(ordered, *least_total_splits_kept(lengths, fresh, caps, decode, prefill), unfit)
        return _groups(ordered, *least_total_splits(whole[lengths], caps), unfit)
    width = int(min(caps.max(), n))
    sizes = np.arange(1, width + 1, dtype=np.int64)
    # cost[j, s - 1]: a batch of s rows ending at sorted index j (its longest row), for every j at once
    if kv_kept:
        fresh = np.array([r.kv_replica is None for r in ordered], dtype=bool)
        cost = _costs_with_kept_caches(time, lengths, fresh, sizes, steps)
    else:
        cost = np.broadcast_to(np.asarray(time.batch_time(sizes[None, :], lengths[:, None], steps), dtype=float),
                               (n, width))
    return _groups(ordered, *least_total_splits(np.ascontiguousarray(cost), np.minimum(caps, width)), unfit)


def _groups(ordered: list[Request], best: np.ndarray, take: np.ndarray, unfit: list[Request]) -> BatchPlan:
    """The split the recurrence chose, read back from its last row."""
    groups: list[list[Request]] = []
    take = take.tolist()
    j = len(ordered)
    while j > 0:
        s = take[j]
        groups.append(ordered[j - s:j])
        j -= s
    groups.reverse()
    return BatchPlan(groups, float(best[len(ordered)]), unfit)


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
