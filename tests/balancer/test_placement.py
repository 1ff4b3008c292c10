from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.placement import LeastWork, MaxMin, ReplicaState, RoundRobin, make_placement
from balancer.types import Batch

import pytest


def batches(times):
    return [Batch(f"b{i}", [], steps=1, est_time=t) for i, t in enumerate(times)]


def replicas(n, slots=100):
    return [ReplicaState(f"w{i}", slots) for i in range(n)]


def spread(reps):
    ends = [r.expected_free_at for r in reps]
    return max(ends) - min(ends)


@settings(max_examples=100, deadline=None)
@given(times=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=60), n=st.integers(1, 8))
def test_maxmin_is_within_grahams_lpt_bound(times, n):
    mm = replicas(n)
    MaxMin().place(batches(times), mm, now=0.0)
    makespan = max(r.expected_free_at for r in mm)
    # Graham: any list schedule is within sum/n + max·(1 - 1/n) ...
    assert makespan <= sum(times) / n + max(times) * (1 - 1 / n) + 1e-9
    # ... and longest-first is within (4/3 - 1/(3n)) of the optimum (brute force on small cases).
    if len(times) <= 8 and n <= 3:
        optimum = min(
            max(sum(t for t, m in zip(times, machines) if m == k) for k in range(n))
            for machines in itertools.product(range(n), repeat=len(times))
        )
        assert makespan <= (4 / 3 - 1 / (3 * n)) * optimum + 1e-9


def test_placement_respects_free_slots_and_records_inflight():
    reps = replicas(2, slots=1)
    out = MaxMin().place(batches([3.0, 2.0, 1.0]), reps, now=5.0)
    assert len(out) == 2  # only two slots
    assert {a.replica_id for a in out} == {"w0", "w1"}
    assert all(len(r.inflight) == 1 for r in reps)
    assert all(a.expected_start == 5.0 for a in out)


def test_round_robin_cycles_and_least_work_fills_the_idle_one():
    reps = replicas(3)
    out = RoundRobin().place(batches([1, 1, 1, 1]), reps, now=0.0)
    assert [a.replica_id for a in out] == ["w0", "w1", "w2", "w0"]
    reps = replicas(2)
    reps[0].expected_free_at = 10.0
    out = LeastWork().place(batches([1.0]), reps, now=0.0)
    assert out[0].replica_id == "w1"


def test_maxmin_balances_better_than_round_robin_on_skewed_work():
    rng = np.random.default_rng(1)
    times = list(rng.pareto(1.5, 200) + 0.1)
    mm, rr = replicas(8), replicas(8)
    MaxMin().place(batches(times), mm, 0.0)
    RoundRobin().place(batches(times), rr, 0.0)
    assert spread(mm) < spread(rr)


def test_unknown_placement_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown placement"):
        make_placement("random")
