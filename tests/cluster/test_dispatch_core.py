"""The dispatch core, one event kind at a time: what it asks the cluster to do, and what it then holds.

No store and no replicas: the test carries out the commands itself, as the Redis adapter and the simulator do.
"""

from __future__ import annotations

import pytest

from balancer.config import SchedulerConfig
from balancer.estimators import LinearKVMemory
from balancer.types import FinishReason, Request, RequestOutcome, SliceResult
from cluster.dispatch_core import (BATCH_TIMEOUT_SLACK, LOSS_GRACE_AFTER_OUTAGE, Commit, CommitOutcome,
                                   CommitProgress, Completed, DispatchCore, Finish, ForgetReplica, HandOver,
                                   LogTiming, Post, Repost)
from cluster.messages import BatchOrder, Progress, ProgressRow, Release, RowReport, SliceReport
from tests.balancer.helpers import LATENCY

BUDGET = 1e9


def make_core(mode: str = "scls", replicas: int = 1, epoch: int = 3, **cfg) -> DispatchCore:
    core = DispatchCore(SchedulerConfig(mode=mode, slice_len=8, max_gen_len=64, **cfg), LATENCY,
                        LinearKVMemory(bytes_per_token=1.0, budget_bytes=BUDGET))
    core.start(epoch)
    for i in range(replicas):
        core.on_replica_joined(f"r{i}", 0.0, keeps_kv=True)
    return core


def arrive(core: DispatchCore, rid: str, max_tokens: int = 20, now: float = 0.0, generated: int = 0) -> list:
    return core.on_arrival(Request(rid, 5, max_tokens, now - 1.0, generated=generated), now)


def orders(commands) -> list[Post]:
    return [c for c in commands if isinstance(c, Post) and isinstance(c.message, BatchOrder)]


def report_all(core: DispatchCore, post: Post, now: float, finish=FinishReason.SLICE_END,
               outcome=CommitOutcome.APPLIED, tokens: int | None = None) -> list:
    """The replica reports every row of the batch; the store answers ``outcome`` to the commit."""
    order = post.message
    steps = order.steps if tokens is None else tokens
    result = SliceResult(order.batch_id, post.replica_id,
                         [RequestOutcome(rid, steps, finish) for rid in order.request_ids], 0.5)
    report = SliceReport(order.batch_id, order.epoch, post.replica_id,
                         [RowReport(rid, list(range(steps)), finish.value) for rid in order.request_ids],
                         elapsed=0.5, n=len(order.request_ids), max_input_len=5)
    commits = core.on_slice(result, order.epoch, now, report)
    assert [type(c) for c in commits] == [Commit]
    return core.on_committed(commits[0], outcome, now)


def test_an_arrival_joins_the_pool_once_and_a_request_that_cannot_fit_is_refused():
    core = make_core()
    assert arrive(core, "a") == [] and arrive(core, "a") == []  # a second announcement changes nothing
    assert core.holds("a") and list(core.scheduler.pool) == ["a"]
    tiny = DispatchCore(SchedulerConfig(mode="scls", slice_len=8), LATENCY, LinearKVMemory(1.0, budget_bytes=10))
    tiny.start(1)
    assert tiny.on_arrival(Request("big", 500, 20, 0.0), 0.0) == [Finish("big", "error")]
    assert not tiny.held()


def test_a_tick_posts_batch_orders_of_this_epoch_and_observes_queue_time_once():
    core = make_core(replicas=2)
    for rid in "abc":
        arrive(core, rid, now=10.0)
    posts = orders(core.tick(10.0))
    assert posts and {rid for p in posts for rid in p.message.request_ids} == {"a", "b", "c"}
    assert all(p.message.epoch == 3 and p.message.batch_id.startswith("e3.b") and p.batch is not None
               for p in posts)
    assert sum(core.queue_time.counts) == 3 and core.queue_time.sum == pytest.approx(3.0)
    assert orders(core.tick(11.0)) == [] and sum(core.queue_time.counts) == 3


def test_a_committed_slice_finishes_some_and_returns_the_rest_to_the_pool():
    core = make_core()
    arrive(core, "short", max_tokens=8)
    arrive(core, "long", max_tokens=20)
    (post,) = orders(core.tick(1.0))
    out = report_all(core, post, 2.0)
    (done,) = [c for c in out if isinstance(c, Completed)]
    assert [r.id for r in done.requests] == ["short"] and done.requests[0].finish_reason is FinishReason.LENGTH
    assert [type(c) for c in out if isinstance(c, LogTiming)] == [LogTiming]  # timing kept for a profile refit
    assert list(core.scheduler.pool) == ["long"] and core.scheduler.pool["long"].generated == 8
    assert core.scheduler.stats.tokens_generated == 16


@pytest.mark.parametrize("outcome", [CommitOutcome.ALREADY_APPLIED, CommitOutcome.GAP])
def test_a_commit_the_store_refuses_requeues_the_batch_untouched(outcome):
    core = make_core()
    arrive(core, "a")
    (post,) = orders(core.tick(1.0))
    assert report_all(core, post, 2.0, outcome=outcome) == []
    assert core.scheduler.pool["a"].generated == 0  # the scheduler never saw the tokens
    assert core.counters.requests_requeued == 1


def test_a_continuous_row_whose_commit_is_refused_is_released_where_it_runs():
    core = make_core(mode="continuous_slices")
    arrive(core, "a")
    (post,) = orders(core.tick(1.0))
    out = report_all(core, post, 2.0, outcome=CommitOutcome.GAP)
    assert out == [Post("r0", Release(["a"], 3))]


def test_results_of_another_epoch_are_stale_or_handed_back():
    core = make_core()
    arrive(core, "a")
    (post,) = orders(core.tick(1.0))
    old = SliceResult(post.message.batch_id, "r0", [RequestOutcome("a", 8, FinishReason.EOS)], 0.1)
    assert core.on_slice(old, 2, 2.0) == [] and core.counters.stale_results == 1
    newer = SliceReport("e4.b0", 4, "r0", [RowReport("x", [1], "eos")])
    assert core.on_slice(old, 4, 2.0, newer) == [Repost(newer)]
    assert core.scheduler.owns(post.message.batch_id)  # still waiting for its own result


def test_a_cancelled_request_is_dropped_from_the_pool_or_released_where_it_runs():
    core = make_core(replicas=1)
    arrive(core, "waiting")
    assert core.on_cancel("waiting") == [Finish("waiting", "cancelled")] and not core.held()
    arrive(core, "running")
    (post,) = orders(core.tick(1.0))
    assert core.on_cancel("running") == [Post("r0", Release(["running"], 3)), Finish("running", "cancelled")]
    commits = core.on_slice(SliceResult(post.message.batch_id, "r0", [RequestOutcome("running", 8, FinishReason.EOS)],
                                        0.1), 3, 2.0)
    assert commits[0].skip == {"running"}  # its tokens are not written
    assert core.on_committed(commits[0], CommitOutcome.APPLIED, 2.0) == [] and not core.held()


def test_a_cancelled_continuous_row_is_closed_on_its_replica():
    core = make_core(mode="continuous_slices")
    arrive(core, "a")
    (post,) = orders(core.tick(1.0))
    lease = post.message.batch_id
    assert core.on_cancel("a") == [Post("r0", Release(["a"], 3, {"a": lease})), Finish("a", "cancelled")]


def test_progress_is_kept_only_for_live_rows_of_this_epoch():
    core = make_core(mode="continuous_slices")
    arrive(core, "a")
    (post,) = orders(core.tick(1.0))
    lease = post.message.batch_id
    mine = ProgressRow("a", lease, 3, 0, [1, 2])
    msg = Progress("r0", [mine, ProgressRow("a", lease, 2, 0, [9]), ProgressRow("b", "e3.b99", 3, 0, [9])])
    assert core.on_progress(msg) == [CommitProgress("r0", [mine])]
    core.on_cancel("a")
    assert core.on_progress(Progress("r0", [mine])) == []


def test_the_kv_budget_is_the_least_any_live_replica_reports():
    core = make_core(replicas=0)
    core.on_replica_joined("big", 0.0, kv_budget_bytes=8e6)
    core.on_replica_joined("small", 0.0, kv_budget_bytes=2e6)
    assert core.scheduler.memory.budget_bytes == 2e6
    core.on_replica_joined("small", 0.0, kv_budget_bytes=1.0)  # already known: nothing changes
    assert core.scheduler.memory.budget_bytes == 2e6


def test_a_lost_replica_returns_what_it_ran_except_during_the_grace_after_an_outage():
    core = make_core(replicas=1)
    arrive(core, "a")
    (post,) = orders(core.tick(1.0))
    core.on_store_back(2.0)
    assert core.on_replica_lost("r0", 2.0 + LOSS_GRACE_AFTER_OUTAGE / 2) == [] and core.knows("r0")
    assert core.on_replica_lost("r0", 2.0 + LOSS_GRACE_AFTER_OUTAGE) == [ForgetReplica("r0")]
    assert list(core.scheduler.pool) == ["a"] and core.counters.requests_requeued == 1
    late = SliceResult(post.message.batch_id, "r0", [RequestOutcome("a", 8, FinishReason.EOS)], 0.1)
    assert core.on_slice(late, 3, 20.0) == []  # its batch is gone: nothing runs twice into the store
    core.on_replica_joined("r1", 20.0)
    (again,) = orders(core.tick(20.0))
    assert again.replica_id == "r1" and again.message.request_ids == ["a"]


def test_an_overdue_batch_goes_back_to_the_pool():
    core = make_core()
    arrive(core, "a")
    (post,) = orders(core.tick(1.0))
    core.expire_overdue(1.0 + BATCH_TIMEOUT_SLACK / 2)
    assert core.scheduler.owns(post.message.batch_id)
    core.expire_overdue(1.0 + 10 * BATCH_TIMEOUT_SLACK)
    assert not core.scheduler.owns(post.message.batch_id) and list(core.scheduler.pool) == ["a"]
    assert core.counters.batches_timed_out == 1


def test_a_superseded_core_hands_everything_over_and_dispatches_nothing_more():
    core = make_core(replicas=1)
    arrive(core, "running")
    orders(core.tick(1.0))
    arrive(core, "waiting")
    assert core.on_epoch(3) == [] and not core.fenced
    assert core.on_epoch(4) == [HandOver(["running", "waiting"])] and core.fenced
    assert core.on_epoch(5) == []  # said once
    arrive(core, "later")
    assert core.tick(2.0) == []


def test_a_restored_request_continues_from_the_tokens_it_has():
    core = make_core()
    arrive(core, "a", max_tokens=20, generated=16)
    (post,) = orders(core.tick(1.0))
    assert post.message.steps == 4  # only what is left of its budget
    assert sum(core.queue_time.counts) == 0  # it waited before the restart; no queue time is made up
