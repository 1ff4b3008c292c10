"""The DP batcher against brute force, and its memory bound, on random pools."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.batcher import ShapeCosts, plan_batches, split_for_parallelism
from tests.balancer.helpers import LATENCY, memory, models, request


def brute_force(lengths: list[int], steps: int, latency, mem, cap: int) -> float:
    """Least total time over every split of the sorted lengths into contiguous feasible runs."""
    lengths = sorted(lengths)
    n = len(lengths)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        total = 0.0
        for lo, hi in zip(bounds, bounds[1:]):
            size, longest = hi - lo, lengths[hi - 1]
            if size > cap or mem.batch_bytes(size, longest, steps) > mem.budget_bytes:
                total = float("inf")
                break
            total += float(latency.batch_time(size, longest, steps))
        best = min(best, total)
    return best


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 400), min_size=1, max_size=10),
    steps=st.integers(1, 64),
    budget=st.integers(500, 4000),
    cap=st.integers(1, 10),
    latency=models,
)
def test_dp_equals_brute_force_and_respects_memory(lengths, steps, budget, cap, latency):
    mem = memory(budget)
    reqs = [request(i, prompt_len=n) for i, n in enumerate(lengths)]
    plan = plan_batches(reqs, steps, latency, mem, cap)

    fits = [r for r in reqs if mem.max_batch_size(r.input_len, steps) >= 1]
    assert {r.id for r in plan.unfit} == {r.id for r in reqs} - {r.id for r in fits}
    # Every schedulable request is in exactly one batch.
    placed = [r.id for g in plan.groups for r in g]
    assert sorted(placed) == sorted(r.id for r in fits)
    for group in plan.groups:
        longest = max(r.input_len for r in group)
        assert len(group) <= cap
        assert mem.batch_bytes(len(group), longest, steps) <= mem.budget_bytes
    if fits:
        optimum = brute_force([r.input_len for r in fits], steps, latency, mem, cap)
        assert np.isclose(plan.total_time, optimum, rtol=1e-9, atol=1e-12)


def kept_cache_cost(group, steps: int, latency) -> float:
    """What the engines spend on a group: fresh rows prefilled padded to their longest, resumed rows one token
    each, every row decoded at the group's longest context."""
    fresh = [r.input_len for r in group if r.kv_replica is None]
    resumed = len(group) - len(fresh)
    longest = max(r.input_len for r in group)
    decode = latency.batch_time(len(group), longest, steps) - latency.batch_time(len(group), longest, 0)
    prefill = (latency.batch_time(len(fresh), max(fresh), 0) if fresh else 0.0) + (
        latency.batch_time(resumed, 1, 0) if resumed else 0.0)
    return float(decode + prefill)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(1, 400), st.booleans()), min_size=1, max_size=9),
    steps=st.integers(1, 64),
    cap=st.integers(1, 9),
    latency=models,
)
def test_dp_with_kept_caches_equals_brute_force(rows, steps, cap, latency):
    """With kept caches the DP's cost of a batch is what the engines spend on it; the DP still finds the
    least total over every contiguous split of the length-sorted rows."""
    reqs = [request(i, prompt_len=n) for i, (n, _) in enumerate(rows)]
    for r, (_, kept) in zip(reqs, rows):
        r.kv_replica = "a" if kept else None
    plan = plan_batches(reqs, steps, latency, memory(10**9), cap, kv_kept=True)
    ordered = sorted(reqs, key=lambda r: (r.input_len, r.id))
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(ordered) - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(ordered)]
        groups = [ordered[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
        if all(len(g) <= cap for g in groups):
            best = min(best, sum(kept_cache_cost(g, steps, latency) for g in groups))
    assert np.isclose(plan.total_time, best, rtol=1e-9, atol=1e-12)
    assert np.isclose(plan.total_time, sum(kept_cache_cost(g, steps, latency) for g in plan.groups),
                      rtol=1e-9, atol=1e-12)


def test_dp_groups_similar_lengths_when_padding_costs():
    # Two clusters of lengths far apart: mixing them pads the short ones to 1000 tokens.
    reqs = [request(i, prompt_len=10 + i) for i in range(4)] + [request(10 + i, prompt_len=1000 + i) for i in range(4)]
    plan = plan_batches(reqs, 16, LATENCY, memory(10**7), 8)
    assert [sorted(r.input_len for r in g) for g in plan.groups] == [[10, 11, 12, 13], [1000, 1001, 1002, 1003]]


def test_dp_scales_to_ten_thousand_requests():
    rng = np.random.default_rng(0)
    reqs = [request(i, prompt_len=int(n)) for i, n in enumerate(rng.integers(4, 1500, 10_000))]
    plan = plan_batches(reqs, 64, LATENCY, memory(200_000), 32)
    assert sum(len(g) for g in plan.groups) == 10_000
    assert all(len(g) <= 32 and len(g) * (max(r.input_len for r in g) + 64) <= 200_000 for g in plan.groups)


def test_split_for_parallelism_reaches_worker_count_without_losing_anyone():
    reqs = [request(i, prompt_len=10) for i in range(9)]
    groups = split_for_parallelism([reqs], 4, cost=len)
    assert len(groups) == 4
    assert sorted(r.id for g in groups for r in g) == sorted(r.id for r in reqs)
    # Cannot split singletons further.
    assert len(split_for_parallelism([[reqs[0]]], 3, cost=len)) == 1


@settings(max_examples=200, deadline=None)
@given(
    pools=st.lists(st.lists(st.tuples(st.integers(1, 3000), st.booleans()), min_size=1, max_size=40),
                   min_size=1, max_size=3),
    steps=st.integers(1, 64),
    budget=st.integers(200, 20_000),
    cap=st.integers(1, 32),
    kv_kept=st.booleans(),
    latency=models,
)
def test_kept_shape_costs_give_the_same_plan_as_a_fresh_matrix(pools, steps, budget, cap, kv_kept, latency):
    """The scheduler keeps the DP's per-shape costs across rounds; every round must plan exactly as a cost
    matrix built afresh does: same groups, same unfit requests, the same total to the last bit."""
    mem = memory(budget)
    kept = ShapeCosts(latency, mem, steps, cap)
    for k, pool in enumerate(pools):  # several rounds through one ShapeCosts: its rows are reused
        reqs = [request(100 * k + i, prompt_len=n) for i, (n, _) in enumerate(pool)]
        for r, (_, cached) in zip(reqs, pool):
            r.kv_replica = "a" if cached else None
        fresh = plan_batches(reqs, steps, latency, mem, cap, kv_kept=kv_kept)
        reused = plan_batches(reqs, steps, latency, mem, cap, kv_kept=kv_kept, costs=kept)
        assert [[r.id for r in g] for g in reused.groups] == [[r.id for r in g] for g in fresh.groups]
        assert [r.id for r in reused.unfit] == [r.id for r in fresh.unfit]
        assert reused.total_time == fresh.total_time


def test_shape_costs_are_kept_only_for_estimators_that_cannot_change():
    assert ShapeCosts.cacheable(LATENCY, memory(1000))

    class Refitting:  # like the live dispatcher's online estimator: its answers change between rounds
        def batch_time(self, n, max_input_len, steps):
            return LATENCY.batch_time(n, max_input_len, steps)

    assert not ShapeCosts.cacheable(Refitting(), memory(1000))


@settings(max_examples=60, deadline=None)
@given(
    pool=st.lists(st.tuples(st.integers(1, 3000), st.booleans()), min_size=1, max_size=200),
    steps=st.integers(1, 64),
    budget=st.integers(200, 200_000),
    cap=st.integers(1, 32),
    kv_kept=st.booleans(),
    kept=st.booleans(),
    latency=models,
)
def test_compiled_recurrence_plans_as_its_python_source(pool, steps, budget, cap, kv_kept, kept, latency):
    """The DP's recurrence runs compiled by Numba; the same functions run as plain Python must give the same
    plan, to the last bit of its total (no fast-math, the same additions in the same order)."""
    import balancer.batcher as batcher
    import balancer.splits as splits

    mem = memory(budget)
    reqs = [request(i, prompt_len=n) for i, (n, _) in enumerate(pool)]
    for r, (_, cached) in zip(reqs, pool):
        r.kv_replica = "a" if cached else None
    costs = ShapeCosts(latency, mem, steps, cap) if kept else None
    compiled = plan_batches(reqs, steps, latency, mem, cap, kv_kept=kv_kept, costs=costs)
    kernels = {name: getattr(batcher, name) for name in ("least_total_splits", "least_total_splits_kept")}
    assert all(hasattr(k, "py_func") for k in kernels.values()), "the recurrence is not compiled"
    choose = splits._choose
    try:
        splits._choose = choose.py_func  # the kernels' own helper, as Python too
        for name, kernel in kernels.items():
            setattr(batcher, name, kernel.py_func)
        python = plan_batches(reqs, steps, latency, mem, cap, kv_kept=kv_kept, costs=costs)
    finally:
        splits._choose = choose
        for name, kernel in kernels.items():
            setattr(batcher, name, kernel)
    assert [[r.id for r in g] for g in compiled.groups] == [[r.id for r in g] for g in python.groups]
    assert [r.id for r in compiled.unfit] == [r.id for r in python.unfit]
    assert compiled.total_time == python.total_time
