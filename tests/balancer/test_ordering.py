"""Ordering policies, and the aging guarantee that keeps any of them from starving a request."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import SchedulerConfig
from balancer.ordering import FCFS, ShortestPredictedFirst, make_ordering, select
from balancer.scheduler import Scheduler
from balancer.types import FinishReason, Request, RequestOutcome, SliceResult
from tests.balancer.helpers import LATENCY, memory, request


def test_policies_rank_as_documented():
    old_long = request(1, arrival=0.0, predicted=500)
    new_short = request(2, arrival=5.0, predicted=10)
    assert select([old_long, new_short], FCFS(), now=6.0, max_wait=100)[0] is old_long
    assert select([old_long, new_short], ShortestPredictedFirst(), now=6.0, max_wait=100)[0] is new_short
    # HRRN: at first the short one's ratio is higher; a long one that has waited long enough overtakes a
    # short one that has only just arrived (service: 1.0 s vs 0.1 s).
    hrrn = make_ordering("hrrn", service_time=lambda r: r.predicted_remaining * 0.01)
    assert select([old_long, new_short], hrrn, now=6.0, max_wait=100)[0] is new_short
    fresh_short = request(3, arrival=59.9, predicted=10)
    assert select([old_long, fresh_short], hrrn, now=60.0, max_wait=1000)[0] is old_long


def test_aged_requests_go_first_oldest_first_and_limit_is_respected():
    pool = [request(i, max_tokens=2000, arrival=float(i), predicted=1000 - i) for i in range(10)]
    order = select(pool, ShortestPredictedFirst(), now=20.0, max_wait=15.0, limit=4)
    # r0..r5 waited >= 15 s: aged, FCFS among them, ahead of the shorter fresh ones.
    assert [r.id for r in order] == ["r0", "r1", "r2", "r3"]
    order = select(pool, ShortestPredictedFirst(), now=10.0, max_wait=100.0)
    assert [r.id for r in order] == [f"r{i}" for i in range(9, -1, -1)]


def run_stream(ordering: str, max_wait: float, cap: int, burst: int, ticks: int, dt: float = 1.0):
    """One replica running one batch per tick; ``burst`` short requests arrive every tick.

    Returns [(time the long request entered the pool, older requests waiting then, time it was dispatched)].
    """
    cfg = SchedulerConfig(mode="scls", slice_len=10, max_batch_size=cap, queue_depth=1,
                          ordering=ordering, max_wait=max_wait)
    sched = Scheduler(cfg, LATENCY, memory(10**9))
    sched.add_replica("w0")
    sched.add_request(Request("long", 10, 40, 0.0, predicted_len=40.0), 0.0)
    entries = [(0.0, 0)]
    dispatches = []
    running = None
    for k in range(ticks):
        now = k * dt
        if running is not None:
            outcomes = []
            for r in running.requests:
                if r.id == "long":
                    outcomes.append(RequestOutcome(r.id, 10, FinishReason.SLICE_END if r.remaining > 10
                                                   else FinishReason.LENGTH))
                else:
                    outcomes.append(RequestOutcome(r.id, r.remaining, FinishReason.EOS))
            sched.on_slice_done(SliceResult(running.id, "w0", outcomes, elapsed=dt), now)
            running = None
            long_req = sched.pool.get("long")
            if long_req is not None and long_req.pool_since == now:
                older = sum(1 for r in sched.pool.values() if r.pool_since < now)
                entries.append((now, older))
        for j in range(burst):
            sched.add_request(Request(f"s{k}_{j}", 10, 2, now, predicted_len=2.0), now)
        for a in sched.schedule(now):
            running = a.batch
            if "long" in a.batch.request_ids:
                dispatches.append(now)
    return entries, dispatches


@settings(max_examples=40, deadline=None)
@given(ordering=st.sampled_from(["fcfs", "sjf", "hrrn"]), max_wait=st.floats(1.0, 20.0),
       cap=st.integers(1, 4), burst=st.integers(1, 6))
def test_aging_bounds_every_wait_under_an_endless_stream_of_short_requests(ordering, max_wait, cap, burst):
    """Bound: a request entering the pool at time p with A older requests waiting is dispatched by
    p + max_wait + dt * (ceil((A + 1) / cap) + 1), whatever the ordering and however fast short ones arrive."""
    ticks = 200
    entries, dispatches = run_stream(ordering, max_wait, cap, burst, ticks=ticks)
    assert dispatches, "the long request was never served"
    for i, (entered, older) in enumerate(entries):
        bound = entered + max_wait + 1.0 * (math.ceil((older + 1) / cap) + 1)
        if bound < ticks - 1:
            assert i < len(dispatches), f"slice {i} not dispatched by {bound} (entered {entered}, {older} older)"
            assert dispatches[i] <= bound, (entered, older, dispatches[i], bound)


def test_without_aging_sjf_starves_the_long_request():
    # The same stream with aging pushed out of reach: shortest-first never picks the long one.
    entries, dispatches = run_stream("sjf", max_wait=1e9, cap=2, burst=2, ticks=200)
    assert dispatches == []


def test_unknown_ordering_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ordering"):
        make_ordering("lifo")
