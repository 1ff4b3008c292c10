"""Continuous slices: leases renewed in place, moves only when they pay, rows and KV bounded per replica."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.types import FinishReason, RequestOutcome, SliceResult
from tests.balancer.helpers import request
from tests.balancer.test_scheduler import complete, make

CS = "continuous_slices"


def slice_end(a, tokens):
    r = a.batch.requests[0]
    return SliceResult(a.batch.id, a.replica_id, [RequestOutcome(r.id, tokens, FinishReason.SLICE_END)], 0.0)


def test_a_slice_end_renews_the_lease_in_place_without_the_pool():
    sched = make(CS, replicas=2, slice_len=16)
    sched.add_request(request(0, max_tokens=40), 0.0)
    [a] = sched.schedule(0.0)
    assert a.batch.steps == 16 and not a.continues and a.moved_from is None
    assert sched.on_slice_done(slice_end(a, 16), 1.0) == []
    assert sched.pool == {} and "r0" in sched.running  # the row never left its replica
    [b] = sched.schedule(1.0)
    assert b.continues and b.replica_id == a.replica_id and b.batch.id != a.batch.id
    assert b.batch.steps == 16 and b.batch.requests[0].generated == 16
    [c] = [x for x in [b] if x]  # the last slice holds only what is left of the budget
    sched.on_slice_done(slice_end(c, 16), 2.0)
    [d] = sched.schedule(2.0)
    assert d.continues and d.batch.steps == 8
    done = complete(sched, d, 3.0)
    assert [r.id for r in done] == ["r0"] and done[0].generated == 40
    assert sched.pending == 0 and all(r.kv_tokens == 0 and not r.inflight for r in sched.replicas.values())


def test_a_request_moves_only_to_a_replica_where_it_finishes_sooner():
    sched = make(CS, replicas=2, slice_len=8, max_running=64, move_margin=0.25)
    for i in range(20):
        sched.add_request(request(i, max_tokens=200), 0.0)
    placed = sched.schedule(0.0)
    # Everything lands somewhere, balanced by predicted work: each replica takes half.
    per = {rid: sum(a.replica_id == rid for a in placed) for rid in sched.replicas}
    assert sorted(per.values()) == [10, 10]
    # All the rows of w1 finish; w0's rows reach a slice end: w1 now runs nothing, so a w0 row moves there.
    w0 = [a for a in placed if a.replica_id == "w0"]
    for a in placed:
        if a.replica_id == "w1":
            r = a.batch.requests[0]
            sched.on_slice_done(SliceResult(a.batch.id, "w1", [RequestOutcome(r.id, 3, FinishReason.EOS)], 0.0), 1.0)
    sched.on_slice_done(slice_end(w0[0], 8), 1.0)
    [m] = sched.schedule(1.0)
    assert m.moved_from == "w0" and m.replica_id == "w1" and not m.continues
    assert sched.replica_of(m.batch.requests[0].id) == "w1"
    # The old lease is void: its late report is stale.
    assert sched.on_slice_done(slice_end(w0[0], 8), 1.5) == [] and sched.stats.stale_results == 1
    # Further boundaries move rows only while the step-time gap beats the margin, then rows stay put.
    rows = lambda rid: len(sched.replicas[rid].inflight)  # noqa: E731
    decisions = []
    for a in w0[1:]:
        sched.on_slice_done(slice_end(a, 8), 2.0)
        [s] = sched.schedule(2.0)
        decisions.append("stay" if s.continues else "move")
    assert "stay" in decisions and decisions.index("stay") > 0
    assert decisions[decisions.index("stay"):] == ["stay"] * (len(decisions) - decisions.index("stay"))
    assert 0 < rows("w0") - rows("w1") < 9


def test_waiting_requests_take_free_rows_before_a_running_one_moves():
    sched = make(CS, replicas=2, slice_len=8, max_running=2)
    for i in range(4):
        sched.add_request(request(i, max_tokens=100), 0.0)
    placed = sched.schedule(0.0)
    assert len(placed) == 4
    sched.add_request(request(9, max_tokens=100), 0.5)
    a = next(x for x in placed if x.replica_id == "w0")
    other = next(x for x in placed if x.replica_id == "w1")
    r = other.batch.requests[0]
    sched.on_slice_done(SliceResult(other.batch.id, "w1", [RequestOutcome(r.id, 2, FinishReason.EOS)], 0.0), 1.0)
    sched.on_slice_done(slice_end(a, 8), 1.0)
    out = sched.schedule(1.0)
    assert {x.batch.requests[0].id for x in out if not x.continues} == {"r9"}
    assert any(x.continues and x.replica_id == "w0" for x in out)


def test_kv_budget_bounds_the_rows_of_each_replica():
    # 10 + 8 = 18 tokens per lease; a budget of 40 tokens holds two rows per replica.
    sched = make(CS, replicas=2, budget=40, slice_len=8, max_running=32)
    for i in range(6):
        sched.add_request(request(i, prompt_len=10, max_tokens=8), 0.0)
    placed = sched.schedule(0.0)
    assert len(placed) == 4 and len(sched.pool) == 2
    for r in sched.replicas.values():
        assert r.kv_tokens <= 40


def test_a_lost_replica_returns_its_rows_and_their_renewals_to_the_pool():
    sched = make(CS, replicas=2, slice_len=8)
    for i in range(4):
        sched.add_request(request(i, max_tokens=100), 0.0)
    placed = sched.schedule(0.0)
    a = next(x for x in placed if x.replica_id == "w0")
    sched.on_slice_done(slice_end(a, 8), 1.0)  # renewed on w0, not yet announced
    back = sched.remove_replica("w0", 1.1)
    assert {r.id for r in back} == {x.batch.requests[0].id for x in placed if x.replica_id == "w0"}
    out = sched.schedule(1.2)
    assert all(x.replica_id == "w1" and not x.continues for x in out) and len(out) == len(back)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 200)), min_size=1, max_size=30),
       st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**16))
def test_every_request_finishes_exactly_once_with_its_true_length(pairs, replicas, slice_len, seed):
    import random

    rnd = random.Random(seed)
    sched = make(CS, replicas=replicas, slice_len=slice_len, max_running=4, budget=4000)
    true_len = {}
    for i, (p, o) in enumerate(pairs):
        sched.add_request(request(i, prompt_len=p, max_tokens=200, predicted=rnd.uniform(1, 200)), 0.0)
        true_len[f"r{i}"] = o
    finished, now, inflight = {}, 0.0, []
    for _ in range(10_000):
        inflight += sched.schedule(now)
        if not inflight:
            break
        a = inflight.pop(rnd.randrange(len(inflight)))
        if not sched.owns(a.batch.id):
            continue  # moved away at the boundary
        for r in complete(sched, a, now, true_len):
            assert r.id not in finished
            finished[r.id] = r
        now += 0.01
        for rep in sched.replicas.values():
            assert len(rep.inflight) <= 4 and rep.kv_tokens <= 4000
    assert set(finished) == set(true_len)
    assert all(finished[k].generated == min(v, 200) for k, v in true_len.items())
    assert sched.pending == 0
