"""The dispatch core: the scheduler and the policy around it, with no I/O.

Events go in: a request arrives (or is restored after a restart), a client cancels, a slice ends, a replica
streams progress, a replica joins or stops beating, another dispatcher takes over, time passes. Commands come
out: post a batch order or a release to a replica, commit a slice's tokens to its requests' records, finish a
request, forget a replica, hand requests over to a successor. The core reads no clock and touches no store.

Two thin adapters carry the commands out. The live dispatcher (:mod:`cluster.dispatcher`) does it against
Redis and feeds back what Redis answered (a commit can find its tokens already there, or a gap before them);
the simulator (:mod:`cluster.sim.simulator`) does it against simulated replicas in virtual time. So the
policy both run is one piece of code: epochs, overdue batches, replica loss, the KV budget, aborts.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, fields
from enum import IntEnum

from balancer.backlog import predicted_backlog_seconds
from balancer.config import SchedulerConfig
from balancer.estimators import LinearKVMemory, MemoryEstimator, SliceTimeEstimator
from balancer.scheduler import Scheduler
from balancer.types import Batch, Mode, Request, SliceResult
from cluster.messages import (BatchOrder, DispatchCounters, MetricsSnapshot, Progress, ProgressRow, Release,
                              ReplicaMetrics, ResultMessage, SliceReport, SliceTiming)
from cluster.metrics import REQUEST_LATENCY_BUCKETS, SnapshotHistogram

log = logging.getLogger("slicefleet.dispatcher")

OVERDUE_CHECK_EVERY = 0.5
"""Seconds between scans for overdue batches."""
BATCH_TIMEOUT_FACTOR = 5.0
BATCH_TIMEOUT_SLACK = 30.0
"""A batch with no result by expected finish + 5 x (expected finish - dispatch) + 30 s is re-placed: generous,
since the estimate can be off several times over while the online fit warms up."""
LOSS_GRACE_AFTER_OUTAGE = 10.0
"""Seconds after the store comes back during which no replica is presumed dead. A Redis restart (or an outage
longer than the heartbeat TTL) lets every heartbeat key expire while the replicas are fine; they beat again
within a second, and forgetting them meanwhile would delete their work streams and restart every worker."""

_NOTHING: frozenset[str] = frozenset()


class CommitOutcome(IntEnum):
    """What the store answered to a :class:`Commit`."""

    ALREADY_APPLIED = 0
    """The store holds this batch's tokens already (the core's counts are behind: a restart in between)."""
    APPLIED = 1
    GAP = 2
    """Tokens before these never arrived: the records and the core disagree on where the requests are."""


# ---- commands ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Post:
    """Put ``message`` on a replica's work stream."""

    replica_id: str
    message: BatchOrder | Release
    batch: Batch | None = None
    """The placed batch behind a :class:`BatchOrder` (the simulator runs it; Redis carries only the order)."""


@dataclass(slots=True)
class Commit:
    """Write a slice's tokens to its requests' records, all or nothing and only once; then tell the core what
    the store answered (:meth:`DispatchCore.on_committed`)."""

    batch_id: str
    replica_id: str
    report: SliceReport | None
    """The replica's report, whose rows hold the tokens (None in the simulator: it has no tokens)."""
    skip: frozenset[str] = _NOTHING
    """Rows not to write: requests cancelled here. (Rows the replica reports aborted are never written either.)"""


@dataclass(slots=True)
class CommitProgress:
    """Append tokens that rows still running streamed before their slice ends (no answer needed)."""

    replica_id: str
    rows: list[ProgressRow]


@dataclass(slots=True)
class Finish:
    """Close a request's record with ``status`` (``error``, ``cancelled``), unless it is done already."""

    request_id: str
    status: str


@dataclass(slots=True)
class Completed:
    """Requests that finished in a slice (their records are closed by the commit; the simulator counts them)."""

    requests: list[Request]


@dataclass(slots=True)
class ForgetReplica:
    """A replica stopped beating: drop its registration and its work stream."""

    replica_id: str


@dataclass(slots=True)
class HandOver:
    """This dispatcher is superseded: announce ``request_ids`` again, so that its successor admits them."""

    request_ids: list[str]


@dataclass(slots=True)
class Repost:
    """A result addressed to a newer epoch than this dispatcher's: put it back for its owner."""

    message: ResultMessage


@dataclass(slots=True)
class LogTiming:
    """A slice's measured timing, kept so that a latency profile can be refit offline."""

    timing: SliceTiming


Command = Post | Commit | CommitProgress | Finish | Completed | ForgetReplica | HandOver | Repost | LogTiming


class DispatchCore:
    """The scheduler with epochs, deadlines, replica loss, KV-budget fitting, aborts and counters.

    Every ``on_*`` method takes an event and returns the commands it calls for, in the order they must be
    carried out. ``tick`` is the scheduling round: overdue batches go back to the pool, then the scheduler's
    plan becomes batch orders.
    """

    def __init__(self, config: SchedulerConfig, latency: SliceTimeEstimator, memory: MemoryEstimator):
        self.config = config
        self.latency = latency
        self.scheduler = Scheduler(config, latency, memory)
        self.continuous = config.mode in (Mode.CONTINUOUS_SLICES, Mode.ILS)
        """Replicas run one continuous batch: cancelled rows are released at once, results carry no batch shape."""
        self.epoch = 0
        self.fenced = False
        """A newer dispatcher took over this store: this one dispatches nothing more (see :meth:`on_epoch`)."""
        self.counters = DispatchCounters()
        self.queue_time = SnapshotHistogram(REQUEST_LATENCY_BUCKETS)
        self.budgets: dict[str, float] = {}
        """Replica id -> the KV bytes it reported; batches must fit the least of the live ones."""
        self._arrivals: dict[str, float] = {}  # request id -> arrival, until its first placement (queue time)
        self._estimates: dict[str, float] = {}  # batch id -> its estimated seconds on its replica
        self._deadlines: list[tuple[float, str]] = []  # (when to give up on a batch's result, batch id), a heap
        self._next_overdue_check = 0.0
        self._committing: dict[str, SliceResult] = {}  # batch id -> its result, between Commit and on_committed
        self._grace_until = 0.0

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self, epoch: int) -> None:
        """Begin as dispatcher ``epoch``; batch ids carry it, so no incarnation reuses an earlier one's."""
        self.epoch = epoch
        self.scheduler.batch_prefix = f"e{epoch}.b"

    def on_epoch(self, current: int) -> list[Command]:
        """The store's current epoch. A newer one means another dispatcher started on this store (a
        NewCluster upgrade, a second cluster): hand over every request held here and stop dispatching.

        The successor restored every unfinished request when it started, but requests that arrived after that
        and were read by this one would otherwise wait forever: announcing them again lets it admit them (it
        ignores those it already has)."""
        if self.fenced or current <= self.epoch:
            return []
        self.fenced = True
        held = sorted(self.held())
        log.warning("dispatcher epoch %d superseded by epoch %d (another dispatcher started on this store): "
                    "handing its %d requests over and dispatching nothing more", self.epoch, current, len(held))
        return [HandOver(held)]

    def on_store_back(self, now: float) -> None:
        """The store answers again after failing: replicas get a grace period to beat before any is lost."""
        self._grace_until = now + LOSS_GRACE_AFTER_OUTAGE

    # ---- requests ---------------------------------------------------------------------------------------
    def held(self) -> set[str]:
        """Ids of the requests in the pool or running."""
        return self.scheduler.pool.keys() | self.scheduler.running.keys()

    def holds(self, request_id: str) -> bool:
        return request_id in self.scheduler.pool or request_id in self.scheduler.running

    def on_arrival(self, request: Request, now: float) -> list[Command]:
        """A new request, or an unfinished one restored with the tokens it has (``request.generated``)."""
        if self.holds(request.id):  # announced twice (a restart, a handover): nothing to do
            return []
        try:
            self.scheduler.add_request(request, now)
        except ValueError as exc:  # it can never run here (too big for any replica's KV budget, or empty)
            log.warning("refusing %s: %s", request.id, exc)
            return [Finish(request.id, "error")]
        if request.generated == 0 and not request.slices:  # never placed: its queue time is still to come
            self._arrivals[request.id] = request.arrival
        return []

    def on_cancel(self, request_id: str) -> list[Command]:
        s = self.scheduler
        replica_id, batch_id = s.replica_of(request_id), s.batch_of(request_id)
        holder = s.pool[request_id].kv_replica if request_id in s.pool else None
        self._arrivals.pop(request_id, None)
        out: list[Command] = []
        if s.abort(request_id):
            log.debug("cancelled %s", request_id)
            if replica_id is not None and self.continuous:
                # The row stops decoding now; the replica closes its lease so the scheduler frees the row.
                out.append(Post(replica_id, Release([request_id], self.epoch, {request_id: batch_id})))
            elif (replica_id or holder) in s.replicas:
                out.append(Post(replica_id or holder, Release([request_id], self.epoch)))  # its kept KV cache
        out.append(Finish(request_id, "cancelled"))
        return out

    # ---- results ----------------------------------------------------------------------------------------
    def on_slice(self, result: SliceResult, epoch: int, now: float,
                 report: SliceReport | None = None) -> list[Command]:
        """A batch (or a lease) ended on a replica. Its tokens are committed first; the scheduler moves on
        only once the store has them (:meth:`on_committed`)."""
        if epoch > self.epoch:
            # A newer dispatcher's batch, reported before this one noticed it was superseded: dropped as stale,
            # that batch would wait for its deadline.
            return [Repost(report)] if report is not None else []
        if epoch != self.epoch or not self.scheduler.owns(result.batch_id):
            self.counters.stale_results += 1
            return []
        skip = _NOTHING
        if self.scheduler.aborting:  # (rows the replica itself aborted are left out by the adapter)
            is_aborted = self.scheduler.is_aborted
            skip = frozenset(o.request_id for o in result.outcomes if is_aborted(o.request_id)) or _NOTHING
        self._committing[result.batch_id] = result
        return [Commit(result.batch_id, result.replica_id, report, skip)]

    def on_committed(self, commit: Commit, outcome: CommitOutcome, now: float) -> list[Command]:
        result = self._committing.pop(commit.batch_id)
        if outcome is not CommitOutcome.APPLIED:
            # Either way, start its requests again from what the store has (workers read it from there).
            log.error("batch %s %s; re-queueing its requests", commit.batch_id,
                      "was already applied" if outcome is CommitOutcome.ALREADY_APPLIED else "left a gap")
            returned = self.scheduler.requeue(commit.batch_id, now)
            self.counters.requests_requeued += len(returned)
            if self.continuous and returned:
                return [Post(result.replica_id, Release([r.id for r in returned], self.epoch))]
            return []
        finished = self.scheduler.on_slice_done(result, now)
        out: list[Command] = [Completed(finished)] if finished else []
        self._account(result, commit.report, out)
        return out

    def on_progress(self, msg: Progress) -> list[Command]:
        """Tokens of rows still running, streamed before their slice ends: kept only for this epoch's live rows."""
        s = self.scheduler
        rows = [o for o in msg.outputs if o.epoch == self.epoch and s.owns(o.batch_id) and not s.is_aborted(o.id)]
        return [CommitProgress(msg.replica_id, rows)] if rows else []

    def _account(self, result: SliceResult, report: SliceReport | None, out: list[Command]) -> None:
        c = self.counters
        c.pad_tokens += result.pad_tokens
        c.invalid_tokens += result.invalid_tokens
        c.reprefill_tokens += result.reprefill_tokens
        if result.kv_reused:
            c.kv_reused_batches += 1
        est = self._estimates.pop(result.batch_id, None)
        if est is None or result.elapsed <= 0 or self.continuous:
            return
        # Prediction error only where a batch's length is bounded by the slice: an SLS batch runs to its
        # longest member, which no estimate made at dispatch knows.
        if self.config.mode is Mode.SCLS:
            c.predicted_slice_seconds_sum += est
            c.actual_slice_seconds_sum += result.elapsed
            c.abs_pct_error_sum += abs(est - result.elapsed) / result.elapsed
            c.slices_estimated += 1
        if report is not None and report.n:
            out.append(self._observe_timing(report, result))

    def _observe_timing(self, report: SliceReport, result: SliceResult) -> LogTiming:
        """Refit the latency model online, and log the timing so a profile can be refit offline from it."""
        n, max_input_len = report.n, report.max_input_len
        if hasattr(self.latency, "observe_result"):
            steps = len(result.decode_step_times) or max((o.new_tokens for o in result.outcomes), default=0)
            self.latency.observe_result(result, n=n, max_input_len=max_input_len, steps=steps)
        return LogTiming(SliceTiming(n, max_input_len, prefill_time=result.prefill_time,
                                     decode_step_times=result.decode_step_times, resumed_rows=report.resumed_rows,
                                     elapsed=result.elapsed, replica_id=result.replica_id))

    # ---- replicas ---------------------------------------------------------------------------------------
    def knows(self, replica_id: str) -> bool:
        return replica_id in self.scheduler.replicas

    def on_replica_joined(self, replica_id: str, now: float, keeps_kv: bool = False,
                          kv_budget_bytes: float | None = None) -> None:
        """A replica beats for the first time (or again after it was presumed lost)."""
        if self.knows(replica_id):
            return
        self.scheduler.add_replica(replica_id, now, keeps_kv=keeps_kv)
        if kv_budget_bytes:
            self.budgets[replica_id] = float(kv_budget_bytes)
            self._fit_budget()

    def on_replica_lost(self, replica_id: str, now: float) -> list[Command]:
        """A replica stopped beating: what it held goes back to the pool as it was (nothing it ran since its
        last report was committed). Ignored during the grace after a store outage."""
        if now < self._grace_until:
            return []
        returned = self.scheduler.remove_replica(replica_id, now)
        self.budgets.pop(replica_id, None)
        self.counters.replicas_lost += 1
        self.counters.requests_requeued += len(returned)
        log.warning("replica %s stopped beating: %d requests back to the pool", replica_id, len(returned))
        return [ForgetReplica(replica_id)]

    def _fit_budget(self) -> None:
        """Batches must fit the smallest replica: the KV budget is the least that any live replica reports."""
        live = [b for rid, b in self.budgets.items() if rid in self.scheduler.replicas]
        memory = self.scheduler.memory
        if live and isinstance(memory, LinearKVMemory) and min(live) != memory.budget_bytes:
            self.scheduler.memory = LinearKVMemory(memory.bytes_per_token, min(live))
            log.info("KV budget per batch: %.1f MiB (least of %d replicas)", min(live) / 2**20, len(live))

    # ---- rounds -----------------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Command]:
        """One scheduling round: overdue batches back to the pool (every so often), then the plan."""
        if self.fenced:
            return []
        if now >= self._next_overdue_check:
            self._next_overdue_check = now + OVERDUE_CHECK_EVERY
            self.expire_overdue(now)
        out: list[Command] = []
        for a in self.scheduler.schedule(now):
            b = a.batch
            expected = a.expected_finish
            self._estimates[b.id] = expected - a.expected_start
            heapq.heappush(self._deadlines, (
                expected + BATCH_TIMEOUT_FACTOR * (expected - now) + BATCH_TIMEOUT_SLACK, b.id))
            arrivals = self._arrivals
            if arrivals:
                for r in b.requests:
                    # Only a request that has not run a slice yet can be on its first placement (the wait vLLM
                    # calls queue time ends there): skips a lookup for every later slice of every request.
                    if not r.slices:
                        arrival = arrivals.pop(r.id, None)
                        if arrival is not None:
                            self.queue_time.observe(max(now - arrival, 0.0))
            ids = [r.id for r in b.requests]
            if a.moved_from is not None:
                self.counters.moves += 1
                out.append(Post(a.moved_from, Release(ids, self.epoch)))
            elif b.cheaper_on:
                # caches kept where earlier slices ran (the replicas the batch was costed on), of no use any more
                for holder in b.cheaper_on:
                    if holder != a.replica_id:
                        out.append(Post(holder, Release([r.id for r in b.requests if r.kv_replica == holder],
                                                        self.epoch)))
            out.append(Post(a.replica_id, BatchOrder(b.id, self.epoch, b.steps, ids, continues=a.continues), b))
        return out

    def expire_overdue(self, now: float) -> None:
        """Re-place batches whose results are long overdue (a lost message, a hung replica). A result that
        turns up later is stale and ignored, so nothing runs twice into the store."""
        deadlines, s = self._deadlines, self.scheduler
        while deadlines and deadlines[0][0] < now:
            _, batch_id = heapq.heappop(deadlines)
            self._estimates.pop(batch_id, None)
            if not s.owns(batch_id):  # answered, or re-placed after its replica died
                continue
            returned = s.requeue(batch_id, now)
            self.counters.batches_timed_out += 1
            self.counters.requests_requeued += len(returned)
            log.warning("batch %s overdue: %d requests back to the pool", batch_id, len(returned))

    # ---- views ------------------------------------------------------------------------------------------
    def kv_usage(self, replica_id: str) -> float:
        """KV cache reserved on a replica over its budget. Continuous batches hold all their rows at once; a
        static-batch replica runs its queued batches one after another, so only the largest counts."""
        batches = self.scheduler.replicas[replica_id].inflight.values()
        reserved = (sum if self.continuous else lambda xs: max(xs, default=0.0))([b.est_bytes for b in batches])
        budget = self.budgets.get(replica_id) or getattr(self.scheduler.memory, "budget_bytes", 0.0)
        return float(reserved) / budget if budget > 0 else 0.0

    def backlog_seconds(self, now: float) -> float:
        """Predicted seconds until the replicas could start a request arriving now."""
        return predicted_backlog_seconds(self.scheduler, now)

    def snapshot(self, now: float, busy: dict[str, float]) -> MetricsSnapshot:
        """The figures the ingress (admission) and /metrics read; ``busy``: replica id -> seconds it computed."""
        s = self.scheduler
        c = self.counters
        st = s.stats
        batches = max(st.batches_completed, 1)
        counted = {f.name: getattr(c, f.name) for f in fields(c)}
        return MetricsSnapshot(
            time=now,
            epoch=self.epoch,
            mode=self.config.mode.value,
            pool_depth=len(s.pool),
            running=len(s.running),
            backlog_seconds=self.backlog_seconds(now),
            batch_size_mean=st.rows_completed / batches,
            slice_time_mape=c.abs_pct_error_sum / c.slices_estimated if c.slices_estimated else 0.0,
            preemptions=c.moves + c.requests_requeued,
            queue_time=self.queue_time.snapshot(),
            replicas={rid: ReplicaMetrics(expected_completion_s=s.replicas[rid].outstanding(now),
                                          busy_seconds=busy.get(rid, 0.0),
                                          inflight_batches=len(s.replicas[rid].inflight),
                                          running_requests=sum(b.size for b in s.replicas[rid].inflight.values()),
                                          kv_usage=self.kv_usage(rid)) for rid in sorted(s.replicas)},
            slices_run=st.rows_completed,
            batches_run=st.batches_completed,
            rows_run=st.rows_completed,
            requests_finished=st.requests_finished,
            tokens_generated=st.tokens_generated,
            early_returns=st.early_returns,
            **counted,
        )
