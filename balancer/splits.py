"""The DP batcher's recurrence, compiled: the least total cost of splitting length-sorted rows into runs.

best[j] = min over s in 1..min(caps[j - 1], j) of best[j - s] + cost(j, s), the smallest s on ties

where cost(j, s) is the estimated time of one batch made of rows j - s + 1 .. j (1-based; row j is its
longest). The recurrence reads a few dozen costs per row for every row of every round, which in Python was a
fifth of a simulated run's time; compiled, it is a rounding error. Numba compiles these loops to machine code
(``cache=True`` keeps the result next to this file, or in the user's cache where that is read-only). Without
Numba they run as the plain Python they are, with the same results, only slower.

Both kernels add and compare in the order the batcher's cost formulas state (no fast-math), so a plan is the
same to the last bit compiled or not.
"""

from __future__ import annotations

import time

import numpy as np

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the package importable without it
    njit = None


def _compiled(func):
    if njit is None:
        return func
    try:
        return njit(cache=True)(func)
    except RuntimeError:  # no writable place for the cache (a read-only install without a home): compile per process
        return njit(func)


@_compiled
def _choose(best, take, j, row, m):
    """best[j] and take[j] from the m windows ending at row j, whose costs are row[0 .. m - 1]."""
    least = np.inf
    size = 0
    for s in range(1, m + 1):
        total = best[j - s] + row[s - 1]
        if total < least:  # strict: the first (smallest) s wins a tie
            least = total
            size = s
    best[j] = least
    take[j] = size


@_compiled
def least_total_splits(cost, caps):
    """``cost[j - 1, s - 1]``: the batch of s rows ending at row j. Returns (best, take): take[j] is the size of
    the last batch in the best split of the first j rows."""
    n = cost.shape[0]
    best = np.zeros(n + 1)
    take = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        _choose(best, take, j, cost[j - 1], min(caps[j - 1], j))
    return best, take


@_compiled
def least_total_splits_kept(lengths, fresh, caps, decode, prefill):
    """``least_total_splits`` where rows with a kept KV cache resume by feeding one token, its costs read from
    per-length tables as the recurrence needs them (no matrix):

        cost(j, s) = decode[L_j, s - 1] + (prefill[F, fresh rows] + prefill[1, resumed rows])

    ``decode[L, s - 1]``: s rows decoded from context L; ``prefill[L, k]``: k rows prefilled padded to L
    (``prefill[L, 0]`` is 0.0); F: the length of the window's last fresh row, also its longest (the rows are
    sorted), 0 when the window has none. ``fresh[j - 1]``: row j has no kept cache.
    """
    n = lengths.shape[0]
    best = np.zeros(n + 1)
    take = np.zeros(n + 1, dtype=np.int64)
    seen_fresh = np.zeros(n + 1, dtype=np.int64)  # fresh rows among the first i
    row = np.empty(decode.shape[1])
    seen = 0
    fresh_len = 0
    for j in range(1, n + 1):
        length = lengths[j - 1]
        if fresh[j - 1]:
            fresh_len = length
            seen += 1
        seen_fresh[j] = seen
        m = min(caps[j - 1], j)
        for s in range(1, m + 1):
            k = seen - seen_fresh[j - s]
            row[s - 1] = decode[length, s - 1] + (prefill[fresh_len, k] + prefill[1, s - k])
        _choose(best, take, j, row, m)
    return best, take


def compile_now() -> float:
    """Compile both kernels (or load them from Numba's cache) now, rather than in the first round that plans
    batches: a serving process calls this at start-up so its first request does not wait for the compiler.
    Returns the seconds it took."""
    started = time.perf_counter()
    caps = np.ones(1, dtype=np.int64)
    least_total_splits(np.zeros((1, 1)), caps)
    least_total_splits_kept(np.ones(1, dtype=np.int64), np.ones(1, dtype=bool), caps, np.zeros((2, 1)),
                            np.zeros((2, 2)))
    return time.perf_counter() - started
