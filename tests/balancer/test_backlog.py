"""The predicted backlog that admission control compares with api.max_backlog_seconds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer import continuous_slices as cs
from balancer.backlog import predicted_backlog_seconds, requests_per_replica
from balancer.config import SchedulerConfig
from balancer.scheduler import Scheduler
from tests.balancer.helpers import LATENCY, memory, request

MODES = ("continuous_slices", "ils", "scls", "sls")

shapes = st.lists(st.tuples(st.integers(1, 400), st.integers(1, 200), st.one_of(st.none(), st.floats(1, 200))),
                  max_size=60)
"""(prompt_len, max_tokens, predicted_len) of a pool's requests."""


def make(mode, replicas=2, budget=10**7, **kw):
    sched = Scheduler(SchedulerConfig(mode=mode, **kw), LATENCY, memory(budget))
    for i in range(replicas):
        sched.add_replica(f"w{i}")
    return sched


def fill(sched, shape, n_placed, first_id=0):
    """Admit ``n_placed`` requests and place what the replicas take (rows, or batches), then return."""
    for i in range(n_placed):
        sched.add_request(request(first_id + i, *shape[:2], predicted=shape[2]), 0.0)
    sched.schedule(0.0)


def add_pool(sched, shape_list, first_id=10_000):
    for i, (p, m, pred) in enumerate(shape_list):
        sched.add_request(request(first_id + i, p, m, predicted=pred), 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_no_replica_is_infinite_with_a_pool_and_zero_without(mode):
    sched = make(mode, replicas=0)
    assert predicted_backlog_seconds(sched, 0.0) == 0.0
    sched.add_request(request(0), 0.0)
    assert predicted_backlog_seconds(sched, 0.0) == math.inf


@pytest.mark.parametrize("mode", MODES)
def test_idle_replicas_and_no_pool_is_zero(mode):
    assert predicted_backlog_seconds(make(mode), 0.0) == 0.0


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=40, deadline=None)
@given(pool=shapes, extra=st.tuples(st.integers(1, 400), st.integers(1, 200), st.one_of(st.none(), st.floats(1, 200))),
       placed=st.integers(0, 150))
def test_one_more_waiting_request_never_lowers_the_backlog(mode, pool, extra, placed):
    sched = make(mode)
    fill(sched, (50, 100, None), placed)
    add_pool(sched, pool)
    before = predicted_backlog_seconds(sched, 0.0)
    add_pool(sched, [extra], first_id=20_000)
    after = predicted_backlog_seconds(sched, 0.0)
    assert 0.0 <= before < math.inf
    assert after >= before * (1 - 1e-12)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=40, deadline=None)
@given(pool=shapes, placed=st.integers(0, 150), more=st.integers(1, 3))
def test_more_replicas_never_raise_the_backlog(mode, pool, placed, more):
    sched = make(mode)
    fill(sched, (50, 100, None), placed)
    add_pool(sched, pool)
    before = predicted_backlog_seconds(sched, 0.0)
    for i in range(more):
        sched.add_replica(f"extra{i}", 0.0)
    after = predicted_backlog_seconds(sched, 0.0)
    assert after <= before * (1 + 1e-12)
    if before > 0:
        assert after < before


def test_scls_costs_a_waiting_request_as_its_share_of_a_full_batch_not_its_solo_time():
    sched = make("scls", replicas=1, max_batch_size=32)
    add_pool(sched, [(100, 64, None)] * 64)
    full_batch = float(LATENCY.batch_time(32, 100, 64))
    # 64 requests are two full batches: the replica needs two batch times before a newcomer starts
    assert predicted_backlog_seconds(sched, 0.0) == pytest.approx(2 * full_batch)
    # solo times / max_batch_size (the old estimate) is two batches of one: five times too low with this model
    assert 2 * full_batch > 5 * (64 * float(LATENCY.batch_time(1, 100, 64)) / 32)


def test_static_modes_add_what_is_already_placed_on_the_replicas():
    sched = make("scls", replicas=2)
    fill(sched, (50, 100, None), 40)
    assert not sched.pool
    placed = sum(r.outstanding(0.0) for r in sched.replicas.values())
    assert placed > 0
    assert predicted_backlog_seconds(sched, 0.0) == pytest.approx(placed / 2)
    assert predicted_backlog_seconds(sched, 1e9) == 0.0  # all of it due to be done long ago


def test_continuous_waiting_fits_free_rows_then_costs_a_share_of_a_full_batch():
    rows = 8
    sched = make("continuous_slices", replicas=2, max_running=rows)
    fill(sched, (50, 100, None), 10)  # 6 of 16 rows free
    add_pool(sched, [(50, 100, None)] * 6)
    assert predicted_backlog_seconds(sched, 0.0) == 0.0  # they all get a row at once
    add_pool(sched, [(50, 100, None)] * 4, first_id=30_000)
    share = cs.row_work(LATENCY, request(0, 50, 100), rows, fresh=True)
    assert predicted_backlog_seconds(sched, 0.0) == pytest.approx(4 * share / 2)


def test_continuous_rows_stop_where_the_kv_budget_does():
    roomy, tight = make("continuous_slices", replicas=1), make("continuous_slices", replicas=1, budget=4 * 200)
    for sched in (roomy, tight):
        add_pool(sched, [(100, 100, None)] * 100)  # 164 KV tokens a lease: the tight budget holds 4 rows
    assert predicted_backlog_seconds(tight, 0.0) > predicted_backlog_seconds(roomy, 0.0) > 0


def test_requests_per_replica_per_mode():
    assert requests_per_replica(SchedulerConfig(mode="continuous_slices", max_running=64)) == 64
    assert requests_per_replica(SchedulerConfig(mode="ils", ils_max_concurrency=16)) == 16
    assert requests_per_replica(SchedulerConfig(mode="scls", max_batch_size=32, queue_depth=2)) == 64
    assert requests_per_replica(SchedulerConfig(mode="sls", sls_batch_size=8, queue_depth=3)) == 24
