"""The Scheduler's bookkeeping in each mode: slices, offload, exactly-once completion, faults."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import SchedulerConfig
from balancer.placement import cost_on
from balancer.scheduler import Scheduler, UnservableRequest
from balancer.types import FinishReason, Mode, RequestOutcome, SliceResult
from tests.balancer.helpers import LATENCY, memory, request


def make(mode="scls", replicas=2, budget=10**7, **kw):
    sched = Scheduler(SchedulerConfig(mode=mode, **kw), LATENCY, memory(budget))
    for i in range(replicas):
        sched.add_replica(f"w{i}")
    return sched


def complete(sched, assignment, now, true_len=None, elapsed=0.1):
    """Report the batch as an engine would: each row runs until its true length, its budget or the step cap."""
    true_len = true_len or {}
    outcomes = []
    for r in assignment.batch.requests:
        target = true_len.get(r.id, 10**9)
        k = min(assignment.batch.steps, target - r.generated, r.remaining)
        if r.generated + k >= target:
            reason = FinishReason.EOS
        elif r.generated + k >= r.max_tokens:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.SLICE_END
        outcomes.append(RequestOutcome(r.id, k, reason))
    return sched.on_slice_done(SliceResult(assignment.batch.id, assignment.replica_id, outcomes, elapsed), now)


def test_scls_runs_one_slice_then_offloads_to_the_pool():
    sched = make(slice_len=16)
    sched.add_request(request(0, max_tokens=40), 0.0)
    [a] = sched.schedule(0.0)
    assert a.batch.steps == 16 and sched.pool == {}
    assert complete(sched, a, 1.0) == []
    assert sched.pool["r0"].generated == 16 and sched.pool["r0"].slices == 1
    [a] = sched.schedule(1.0)
    complete(sched, a, 2.0)
    [a] = sched.schedule(2.0)
    assert a.batch.steps == 8  # only the last 8 tokens of the budget are left
    [done] = complete(sched, a, 3.0)
    assert done.generated == 40 and done.finish_reason is FinishReason.LENGTH and sched.pending == 0


def test_max_tokens_is_capped_by_g_and_bad_requests_are_refused():
    sched = make(max_gen_len=50)
    r = request(0, max_tokens=10_000)
    sched.add_request(r, 0.0)
    assert r.max_tokens == 50
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add_request(request(0), 0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add_request(request(1, max_tokens=0), 0.0)
    small = make(budget=100)
    with pytest.raises(UnservableRequest, match="KV cache"):
        small.add_request(request(2, prompt_len=90, max_tokens=50), 0.0)


def test_sls_is_fcfs_with_fixed_batches_run_to_completion():
    sched = make("sls", replicas=1, sls_batch_size=3, queue_depth=1)
    for i in range(7):
        sched.add_request(request(i, arrival=float(i), max_tokens=100, predicted=100 - i), float(i))
    [a] = sched.schedule(10.0)
    assert a.batch.request_ids == ["r0", "r1", "r2"]
    assert a.batch.steps == 100  # no slicing: the whole budget
    assert sched.schedule(10.0) == []  # the one slot is taken


def test_ils_admits_individually_under_the_concurrency_cap():
    sched = make("ils", replicas=2, ils_max_concurrency=3)
    for i in range(10):
        sched.add_request(request(i), 0.0)
    out = sched.schedule(0.0)
    assert len(out) == 6 and all(a.batch.size == 1 for a in out)
    per = {}
    for a in out:
        per[a.replica_id] = per.get(a.replica_id, 0) + 1
    assert per == {"w0": 3, "w1": 3}
    complete(sched, out[0], 1.0)
    assert len(sched.schedule(1.0)) == 1


def test_stale_and_duplicate_results_are_ignored():
    sched = make()
    sched.add_request(request(0, max_tokens=10), 0.0)
    [a] = sched.schedule(0.0)
    [done] = complete(sched, a, 1.0)
    assert done.id == "r0"
    assert complete(sched, a, 2.0) == []  # the same result again: nothing finishes twice
    assert sched.stats.stale_results == 1


def test_dead_replica_returns_its_work_to_the_pool_unchanged():
    sched = make(replicas=2, slice_len=8)
    for i in range(4):
        sched.add_request(request(i, prompt_len=10 + 300 * i), 0.0)
    out = sched.schedule(0.0)
    lost = [a for a in out if a.replica_id == "w0"]
    assert lost
    returned = sched.remove_replica("w0", 1.0)
    assert sorted(r.id for r in returned) == sorted(r.id for a in lost for r in a.batch.requests)
    assert all(r.generated == 0 for r in returned)
    assert all(a.replica_id == "w1" for a in sched.schedule(1.0))
    # A late result from the dead replica is ignored rather than applied twice.
    assert complete(sched, lost[0], 2.0) == []


def test_requeue_and_abort():
    sched = make(replicas=1)
    sched.add_request(request(0), 0.0)
    sched.add_request(request(1), 0.0)
    [a] = sched.schedule(0.0)
    assert sched.abort("r1")
    sched.requeue(a.batch.id, 0.5)
    assert list(sched.pool) == ["r0"]  # r1 was aborted while placed, so it does not come back
    assert not sched.abort("nope")


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(list(Mode)),
    lens=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 200), st.integers(1, 200)), min_size=1, max_size=25),
    slice_len=st.integers(1, 64),
    replicas=st.integers(1, 4),
    budget=st.integers(2_000, 50_000),
)
def test_every_request_finishes_exactly_once_within_budget_and_memory(mode, lens, slice_len, replicas, budget):
    sched = make(mode.value, replicas=replicas, budget=budget, slice_len=slice_len, max_batch_size=8,
                 sls_batch_size=4, ils_max_concurrency=4)
    true_len, admitted = {}, set()
    for i, (plen, budget_tokens, true) in enumerate(lens):
        r = request(i, prompt_len=plen, max_tokens=budget_tokens)
        try:
            sched.add_request(r, 0.0)
        except UnservableRequest:
            continue
        admitted.add(r.id)
        true_len[r.id] = true
    finished, now = [], 0.0
    for _ in range(10_000):
        out = sched.schedule(now)
        if not out and not sched.pending:
            break
        for a in out:
            assert a.batch.est_bytes <= budget
            if mode is Mode.SCLS:
                assert a.batch.steps <= slice_len
            now += 0.01
            finished += complete(sched, a, now, true_len)
    ids = [r.id for r in finished]
    assert sorted(ids) == sorted(admitted) and len(ids) == len(set(ids))
    for r in finished:
        assert r.generated == min(true_len[r.id], r.max_tokens)
        assert r.generated <= r.max_tokens


def test_a_continuing_batch_goes_back_to_the_replica_that_kept_its_kv_cache():
    sched = make(replicas=1, slice_len=8, max_batch_size=4, queue_depth=1)
    for i in range(4):
        sched.add_request(request(i, prompt_len=200, max_tokens=64), 0.0)
    [first] = sched.schedule(0.0)
    complete(sched, first, 1.0)
    assert all(r.kv_replica == "w0" for r in sched.pool.values())
    # A second replica joins, idle: both are free at t=1, so only the saved prefill can decide.
    sched.add_replica("w1", 1.0)
    out = sched.schedule(1.0)
    on_w0 = [a for a in out if a.replica_id == "w0"]
    assert len(on_w0) == 1
    batch = on_w0[0].batch
    assert cost_on(batch, "w0") < cost_on(batch, "w1")
    # Each placement's expected duration is the batch's cost on the replica it went to.
    for a in out:
        assert a.expected_finish - a.expected_start == pytest.approx(cost_on(a.batch, a.replica_id))


def test_a_replica_that_keeps_no_kv_is_never_a_cache_holder():
    """What the replica reports wins over the config: DeepSpeed's injected kernels keep no cache."""
    sched = make(replicas=0, slice_len=8)
    sched.add_replica("w0", 0.0, keeps_kv=False)
    sched.add_request(request(0, prompt_len=200, max_tokens=64), 0.0)
    [a] = sched.schedule(0.0)
    complete(sched, a, 1.0)
    assert sched.pool["r0"].kv_replica is None
    sched.add_replica("w1", 1.0)  # keeps its caches
    [b] = sched.schedule(1.0)
    assert cost_on(b.batch, "w0") == cost_on(b.batch, "w1")  # no saved prefill anywhere
    complete(sched, b, 2.0)
    assert sched.pool["r0"].kv_replica == (b.replica_id if b.replica_id == "w1" else None)


def test_without_kv_reuse_cost_is_the_same_everywhere():
    sched = make(replicas=2, slice_len=8, kv_reuse=False)
    sched.add_request(request(0, prompt_len=200, max_tokens=64), 0.0)
    [a] = sched.schedule(0.0)
    complete(sched, a, 1.0)
    assert sched.pool["r0"].kv_replica is None


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(1, 2000), st.integers(0, 300), st.sampled_from([None, "a", "b", "c"])),
                     min_size=1, max_size=32))
def test_a_batch_costs_on_each_cache_holder_its_fresh_rows_prefill(rows):
    """On a replica that keeps some rows' caches, only the other rows are prefilled, padded to the longest of
    them (all rows resumed: one token each); the decode is the same everywhere."""
    sched = Scheduler(SchedulerConfig(mode=Mode.SCLS), LATENCY, memory(10**9))
    for rid in ("a", "b", "c"):
        sched.add_replica(rid)
    reqs = [request(i, prompt_len=p, max_tokens=1000, generated=g) for i, (p, g, _) in enumerate(rows)]
    for r, (_, _, at) in zip(reqs, rows):
        r.kv_replica = at
    batch = sched._make_batch(reqs, 64)
    full_prefill = float(LATENCY.batch_time(len(reqs), batch.max_input_len, 0))
    expected = {}
    for holder in {at for _, _, at in rows} - {None}:
        fresh = [r.input_len for r in reqs if r.kv_replica != holder]
        prefill = LATENCY.batch_time(len(fresh), max(fresh), 0) if fresh else LATENCY.batch_time(len(reqs), 1, 0)
        expected[holder] = max(batch.est_time - full_prefill + float(prefill), 0.0)
    assert batch.cheaper_on == expected
