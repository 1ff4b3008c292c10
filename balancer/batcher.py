"""SCLS's dynamic-programming batcher.

Sort the candidates by current input length and split them into contiguous runs. A run of n requests whose
longest input is L costs ``time.batch_time(n, L, steps)`` and needs ``memory.batch_bytes(n, L, steps)``; the DP
picks the split with the least total estimated time such that every run fits the memory budget and the
batch-size cap. Contiguity after sorting is what makes this tractable: a batch is padded to its longest
member, so mixing far-apart lengths only adds padding.

best[j] = min over s in 1..cap(L_j) of best[j - s] + cost(s, L_j)

The costs for every (j, s) come from one vectorised call to the estimator, or, when the scheduler keeps a
``ShapeCosts`` across rounds, from rows per length computed once; the recurrence is then a short loop per row.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from operator import add

import numpy as np

from balancer.estimators import BilinearLatencyModel, LinearKVMemory, MemoryEstimator, SliceTimeEstimator
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


MATRIX_FROM_ROWS = 64
"""Pools of at least this many rows are costed as one matrix even where per-shape costs are kept (below it,
NumPy's per-call overhead costs more than the arithmetic)."""


class _ByLength(dict):
    """length -> ``compute(length)``, computed on first use. A known length is a plain subscript: the DP reads
    several of these per request of every round, where a method call per read was a tenth of its time."""

    def __init__(self, compute):
        super().__init__()
        self._compute = compute

    def __missing__(self, length: int):
        value = self[length] = self._compute(length)
        return value


class ShapeCosts:
    """What the DP asks of the estimators, asked once per shape and kept: for one slice length, the row cap
    of each longest input, and for each length the costs over every batch size.

    Rounds of a long run see the same few thousand input lengths again and again, and NumPy's per-call
    overhead on a pool of a few dozen requests costs more than the arithmetic, so a cost matrix built afresh
    each round was a quarter of the simulator's time. Each row is computed by the same estimator call on a
    NumPy row as the matrix would, so the DP sees bit-identical costs.

    Each table is read by length: ``cap[L]``, ``whole[L][s - 1]``, ... Keep one only while the estimators are
    pure functions of the shape: see ``cacheable``.
    """

    def __init__(self, time: SliceTimeEstimator, memory: MemoryEstimator, steps: int, max_batch_size: int):
        self.time, self.memory, self.steps, self.max_batch_size = time, memory, steps, max_batch_size
        self._sizes = np.arange(1, max_batch_size + 1, dtype=np.int64)
        self.cap = _ByLength(self._cap)
        """Largest batch allowed when its longest row has L tokens (memory and the size cap)."""
        self.whole = _ByLength(self._whole)
        """[s - 1]: a batch of s rows padded to L, prefill and decode."""
        self.decode = _ByLength(self._decode)
        """[s - 1]: the decode steps alone of s rows whose longest context starts at L."""
        self.prefill = _ByLength(self._prefill)
        """[k]: the prefill of k rows padded to L (0.0 for none)."""
        self.resumed_only = _ByLength(self._resumed_only)
        """[s - 1]: s resumed rows (each feeds one token) decoded from L: no fresh row to prefill."""
        self._tables: tuple[np.ndarray, np.ndarray] | None = None

    def tables(self, longest: int) -> tuple[np.ndarray, np.ndarray]:
        """``decode`` and ``prefill`` for every length up to ``longest`` at once, as arrays indexed
        ``[L, s - 1]`` and ``[L, k]``, for ``_kept_caches_matrix``'s gathers. Computed by the same estimator
        call as the rows (one column of lengths instead of one length), so they hold the same bits."""
        if self._tables is None or len(self._tables[0]) <= longest:
            top = max(2 * longest, 4096)  # room to grow: rounds see a few thousand lengths, rebuilt rarely
            column = np.arange(top + 1, dtype=float)[:, None]
            sizes = self._sizes[None, :]
            decode = np.asarray(self.time.batch_time(sizes, column, self.steps)
                                - self.time.batch_time(sizes, column, 0), dtype=float)
            prefill = np.zeros((top + 1, self.max_batch_size + 1))
            prefill[:, 1:] = np.asarray(self.time.batch_time(sizes, column, 0), dtype=float)
            self._tables = decode, prefill
        return self._tables

    @staticmethod
    def cacheable(time: SliceTimeEstimator, memory: MemoryEstimator) -> bool:
        """Whether the estimators always answer the same for the same shape (frozen, closed form). The live
        dispatcher's online latency estimator refits itself between rounds, so it is not."""
        return type(time) is BilinearLatencyModel and type(memory) is LinearKVMemory

    def matches(self, time: SliceTimeEstimator, memory: MemoryEstimator, steps: int, max_batch_size: int) -> bool:
        return (self.time is time and self.memory is memory and self.steps == steps
                and self.max_batch_size == max_batch_size)

    def _cap(self, length: int) -> int:
        return min(self.max_batch_size, self.memory.max_batch_size(length, self.steps))

    def _whole(self, length: int) -> list[float]:
        return np.asarray(self.time.batch_time(self._sizes, length, self.steps), dtype=float).tolist()

    def _decode(self, length: int) -> list[float]:
        longest = float(length)
        return np.asarray(self.time.batch_time(self._sizes, longest, self.steps)
                          - self.time.batch_time(self._sizes, longest, 0), dtype=float).tolist()

    def _prefill(self, length: int) -> list[float]:
        return [0.0] + np.asarray(self.time.batch_time(self._sizes, length, 0), dtype=float).tolist()

    def _resumed_only(self, length: int) -> list[float]:
        resumed = self.prefill[1]
        return [d + (0.0 + resumed[s]) for s, d in enumerate(self.decode[length], 1)]


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
    if costs is not None:
        return _plan_with_kept_costs(ordered, costs, kv_kept)
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
    return _split(ordered, cost, np.minimum(caps, width).tolist(), unfit)


def _plan_with_kept_costs(ordered: list[Request], costs: ShapeCosts, kv_kept: bool) -> BatchPlan:
    """``plan_batches`` from the rows kept per length instead of a cost matrix."""
    lengths = [r.prompt_len + r.generated for r in ordered]  # input_len, inlined (hot)
    caps = [costs.cap[length] for length in lengths]
    unfit = [r for r, c in zip(ordered, caps) if c < 1]
    if unfit:
        ordered = [r for r, c in zip(ordered, caps) if c >= 1]
        lengths = [length for length, c in zip(lengths, caps) if c >= 1]
        caps = [c for c in caps if c >= 1]
    if not ordered:
        return BatchPlan([], 0.0, unfit)
    if not kv_kept:
        return _split(ordered, [costs.whole[length] for length in lengths], caps, unfit)
    if len(ordered) >= MATRIX_FROM_ROWS:
        return _split(ordered, _kept_caches_matrix(ordered, lengths, costs), caps, unfit)
    best, take = _least_total_splits_with_kept_caches(ordered, lengths, caps, costs)
    return _groups(ordered, best, take, unfit)


def _least_total_splits_with_kept_caches(ordered: list[Request], lengths: list[int], caps: list[int],
                                         costs: ShapeCosts) -> tuple[list[float], list[int]]:
    """``_least_total_splits`` over the costs ``_costs_with_kept_caches`` gives, each computed as the recurrence
    reads it (same operations, same order, so the same bits) instead of as a matrix first.

    A window of resumed rows only costs what a row kept per length says; most windows are such, as most of a
    pool is resumed rows (a request arrives fresh once and comes back for each slice after). A window that
    reaches a fresh row adds the fresh rows' prefill, padded to the last fresh row of the window.
    """
    n = len(ordered)
    best = [0.0] * (n + 1)
    take = [0] * (n + 1)
    resumed_prefill = costs.prefill[1]
    resumed_rows, decode_rows, prefill_rows = costs.resumed_only, costs.decode, costs.prefill
    seen_fresh = [0] * (n + 1)  # seen_fresh[i]: fresh rows among the first i
    last_fresh, last_fresh_len, seen = 0, 0, 0  # the latest fresh row so far (1-based, 0: none), its length
    for j, length, r, cap in zip(range(1, n + 1), lengths, ordered, caps):
        if r.kv_replica is None:
            last_fresh, last_fresh_len = j, length
            seen += 1
        seen_fresh[j] = seen
        m = cap if cap < j else j  # (conditionals rather than min(): this runs for every request of a round)
        clean = j - last_fresh  # windows of up to this many rows hold resumed rows only
        if clean > m:
            clean = m
        least, size, row = math.inf, 0, resumed_rows[length]
        for s in range(1, clean + 1):
            total = best[j - s] + row[s - 1]
            if total < least:
                least, size = total, s
        if clean < m:
            fresh_prefill, decode = prefill_rows[last_fresh_len], decode_rows[length]
            for s in range(clean + 1, m + 1):
                n_fresh = seen - seen_fresh[j - s]
                total = best[j - s] + (decode[s - 1] + (fresh_prefill[n_fresh] + resumed_prefill[s - n_fresh]))
                if total < least:
                    least, size = total, s
        best[j], take[j] = least, size
    return best, take


def _kept_caches_matrix(ordered: list[Request], lengths: list[int], costs: ShapeCosts) -> list[list[float]]:
    """The cost matrix ``_costs_with_kept_caches`` gives, gathered from ``costs``' tables: cost[j - 1][s - 1]
    for the s rows ending at row j (1-based, sorted by length) is

        decode[L_j][s - 1] + (prefill[F][fresh rows] + prefill[1][resumed rows])

    with F the length of the window's last fresh row (prefill[F][0] is 0.0: a window of resumed rows only),
    the same operations in the same order as ``_least_total_splits_with_kept_caches``, so the same bits.
    Entries past a row's window (s > j) are filler that the recurrence never reads.
    """
    n, width = len(ordered), costs.max_batch_size
    decode, prefill = costs.tables(lengths[-1])  # sorted: the last length is the longest
    length = np.array(lengths, dtype=np.int64)
    fresh = np.fromiter((r.kv_replica is None for r in ordered), dtype=bool, count=n)
    seen_fresh = np.concatenate(([0], np.cumsum(fresh)))  # fresh rows among the first i
    end = np.arange(1, n + 1)[:, None]
    sizes = costs._sizes[None, :]
    n_fresh = seen_fresh[end] - seen_fresh[np.maximum(end - sizes, 0)]
    n_resumed = np.clip(sizes - n_fresh, 0, width)
    # the last fresh row up to j is also the longest (the rows are sorted); 0 before any
    last_fresh_len = np.maximum.accumulate(np.where(fresh, length, 0))[:, None]
    return (decode[length] + (prefill[last_fresh_len, n_fresh] + prefill[1][n_resumed])).tolist()


def _split(ordered: list[Request], cost: list[list[float]], caps: list[int], unfit: list[Request]) -> BatchPlan:
    best, take = _least_total_splits(cost, caps)
    return _groups(ordered, best, take, unfit)


def _groups(ordered: list[Request], best: list[float], take: list[int], unfit: list[Request]) -> BatchPlan:
    """The split the recurrence chose, read back from its last row."""
    groups: list[list[Request]] = []
    j = len(ordered)
    while j > 0:
        s = take[j]
        groups.append(ordered[j - s:j])
        j -= s
    groups.reverse()
    return BatchPlan(groups, best[len(ordered)], unfit)


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
        m = caps[j - 1]
        stop = j - m - 1  # best[j - 1], best[j - 2], ..., best[j - m]: a reversed slice, up to the start
        before = best[j - 1:stop:-1] if stop >= 0 else best[j - 1::-1]
        # The window's totals added and compared in C (map, min, index) rather than a Python loop: this runs
        # for every request of every round. min keeps the first of equal totals and index finds the first,
        # so ties still go to the smallest s, and each total is the same one addition as before.
        totals = list(map(add, before, cost[j - 1]))
        least = min(totals)
        best[j], take[j] = least, totals.index(least) + 1
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
