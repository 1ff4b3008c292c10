"""The scheduler: one interface, three modes (SCLS, SLS, ILS).

In the spirit of vLLM v1's scheduler: ``add_request`` puts work in, ``schedule(now)`` returns a plan
(batches assigned to replicas), ``on_slice_done(result, now)`` takes what a replica did and returns the
requests that finished. The scheduler executes nothing and reads no clock: the live dispatcher passes wall
time and the simulator passes virtual time, so the same decisions drive both.

How a round works in SCLS: the ordering policy (with aging) chooses *who* is served next, up to what the free
replica slots can hold; the DP batcher chooses *how they are grouped* under the memory bound; the placement
policy chooses *where* each batch runs. A batch runs for one slice of S tokens at most; its unfinished
requests come back to the pool and may continue anywhere.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from balancer import continuous_slices as cs
from balancer.batcher import ShapeCosts, plan_batches, split_for_parallelism
from balancer.config import SchedulerConfig
from balancer.estimators import MemoryEstimator, SliceTimeEstimator
from balancer.ordering import make_ordering, select
from balancer.placement import OpenReplicas, ReplicaState, make_placement
from balancer.types import Assignment, Batch, FinishReason, Mode, Request, SliceResult


class UnservableRequest(ValueError):
    """A request that can never run on these replicas (its single-row batch exceeds the memory budget)."""


@dataclass
class SchedulerStats:
    batches_scheduled: int = 0
    rows_scheduled: int = 0
    batches_completed: int = 0
    requests_finished: int = 0
    early_returns: int = 0
    """Requests that finished in a batch some of whose members still needed more tokens."""
    stale_results: int = 0
    """Results for batches the scheduler no longer tracks (duplicates after a reclaim); ignored."""
    rows_completed: int = 0
    """Rows of completed batches that the replica reported on (a slice of one request each)."""
    tokens_generated: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, time: SliceTimeEstimator, memory: MemoryEstimator):
        self.config = config
        self.time = time
        self.memory = memory
        self.pool: dict[str, Request] = {}
        self.running: dict[str, Request] = {}
        self.replicas: dict[str, ReplicaState] = {}
        self._index = OpenReplicas()  # which replicas have a free slot, kept up to date: no fleet scan per round
        self.stats = SchedulerStats()
        self._owner: dict[str, str] = {}  # batch id -> replica id
        self._aborted: set[str] = set()
        self._batch_of: dict[str, str] = {}  # running request id -> its batch id
        self._boundary: list[Batch] = []  # continuous slices: leases renewed in place, not yet announced
        self._rr_cursor = 0
        self._shape_costs: ShapeCosts | None = None  # the DP's per-shape costs, kept across rounds
        self._batch_ids = itertools.count()
        self.batch_prefix = "b"
        """Batch ids are ``{batch_prefix}{n}``; a restarted dispatcher sets a new prefix so ids never repeat."""
        ordering = "fcfs" if config.mode is Mode.SLS else config.ordering
        self.ordering = make_ordering(ordering, self.service_time, config.hrrn_service_floor)
        self.placement = make_placement(config.placement)

    # ---- replicas -------------------------------------------------------------------------------------
    def add_replica(self, replica_id: str, now: float = 0.0, keeps_kv: bool = True) -> None:
        if replica_id in self.replicas:
            return
        mode = self.config.mode
        slots = (self.config.ils_max_concurrency if mode is Mode.ILS
                 else self.config.max_running if mode is Mode.CONTINUOUS_SLICES else self.config.queue_depth)
        self.replicas[replica_id] = ReplicaState(replica_id, slots, expected_free_at=now, keeps_kv=keeps_kv)
        self._index.update(self.replicas[replica_id])

    def remove_replica(self, replica_id: str, now: float) -> list[Request]:
        """Forget a replica (dead or drained); everything it held goes back to the pool, unchanged."""
        replica = self.replicas.pop(replica_id, None)
        if replica is None:
            return []
        self._index.discard(replica_id)
        returned: list[Request] = []
        for batch_id in list(replica.inflight):
            returned += self._return_batch(replica.inflight.pop(batch_id), now)
            self._owner.pop(batch_id, None)
        self._boundary = [b for b in self._boundary if b.id in self._owner]
        for req in self.pool.values():  # caches held there are gone
            if req.kv_replica == replica_id:
                req.kv_replica = None
        return returned

    def requeue(self, batch_id: str, now: float) -> list[Request]:
        """A placed batch that will not run (its replica lost it): its requests rejoin the pool as they were."""
        replica_id = self._owner.pop(batch_id, None)
        if replica_id is None:
            return []
        replica = self.replicas[replica_id]
        batch = self._take(replica, batch_id)
        self._refresh_expected_free(replica, now)
        return self._return_batch(batch, now)

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(self, request: Request, now: float) -> None:
        """Admit a request to the pool (also used to restore requests after a restart)."""
        if request.id in self.pool or request.id in self.running:
            raise ValueError(f"request {request.id!r} is already scheduled")
        request.max_tokens = min(request.max_tokens, self.config.max_gen_len)
        if request.max_tokens < 1 or request.prompt_len < 1:
            raise ValueError(f"request {request.id!r} needs prompt_len >= 1 and max_tokens >= 1")
        longest, steps = self._worst_case_shape(request)
        if self.memory.max_batch_size(longest, steps) < 1:
            raise UnservableRequest(
                f"request {request.id!r} needs {self.memory.batch_bytes(1, longest, steps):.0f} bytes of KV cache "
                f"for one row, more than a replica's budget"
            )
        request.pool_since = now
        self.pool[request.id] = request

    def abort(self, request_id: str) -> bool:
        """Drop a request (client went away). A running one is dropped when its batch reports."""
        if self.pool.pop(request_id, None) is not None:
            return True
        if request_id in self.running:
            self._aborted.add(request_id)
            return True
        return False

    def service_time(self, request: Request) -> float:
        """Predicted seconds the request still needs when run alone (HRRN's service)."""
        steps = max(int(math.ceil(request.predicted_remaining)), 1)
        return float(self.time.batch_time(1, request.input_len, steps))

    # ---- scheduling -----------------------------------------------------------------------------------
    def batch_of(self, request_id: str) -> str | None:
        """The batch a running request belongs to (``None`` if it is not running)."""
        return self._batch_of.get(request_id)

    def replica_of(self, request_id: str) -> str | None:
        """The replica running a request (``None`` if it is not running)."""
        batch_id = self._batch_of.get(request_id)
        return None if batch_id is None else self._owner.get(batch_id)

    def schedule(self, now: float) -> list[Assignment]:
        """Place as much of the pool as the replicas' free slots take, and return the placements."""
        if self.config.mode is Mode.CONTINUOUS_SLICES:
            return self._continuous_round(now)
        free = self._index.free_slots
        if not self.pool or free <= 0:
            return []
        if self.config.mode is Mode.SCLS:
            batches = self._slice_batches(now, free)
        elif self.config.mode is Mode.SLS:
            batches = self._static_batches(now, free)
        else:
            batches = self._admissions(now, free)
        if not batches:
            return []
        assignments = self.placement.place(batches, self.placement.candidates(batches, self._index, now), now)
        for replica_id in {a.replica_id for a in assignments}:
            self._index.update(self.replicas[replica_id])
        for a in assignments:
            self._record(a)
        return assignments

    def _record(self, a: Assignment) -> None:
        batch = a.batch
        self._owner[batch.id] = a.replica_id
        pool, running, batch_of = self.pool, self.running, self._batch_of
        for r in batch.requests:
            rid = r.id
            pool.pop(rid, None)
            running[rid] = r
            batch_of[rid] = batch.id
        self.stats.batches_scheduled += 1
        self.stats.rows_scheduled += batch.size

    # ---- continuous slices ----------------------------------------------------------------------------
    def _continuous_round(self, now: float) -> list[Assignment]:
        """Newcomers join first (a waiting request takes a free row before a running one may move into it);
        then each lease renewed since the last round stays where it is, or moves where it finishes sooner."""
        out: list[Assignment] = []
        if self.pool and self._index.free_slots > 0:
            chosen = select(list(self.pool.values()), self.ordering, now, self.config.max_wait,
                            limit=self._index.free_slots)
            batches = [self._make_batch([r], min(self.config.slice_len, r.remaining)) for r in chosen]
            for batch in sorted(batches, key=lambda b: (-b.est_time, b.id)):
                target = self._continuous_target(batch, now, exclude=None)
                if target is not None:
                    out.append(self._assign_row(batch, target, now))
        renewed, self._boundary = self._boundary, []
        for batch in renewed:
            home_id = self._owner.get(batch.id)
            if home_id is None or batch.requests[0].id in self._aborted:
                continue  # its replica is gone or it was cancelled: the pool or the release handles it
            out.append(self._renew_or_move(batch, self.replicas[home_id], now))
        for a in out:
            self._record(a)
        return out

    def _continuous_target(self, batch: Batch, now: float, exclude: str | None) -> ReplicaState | None:
        """Where a row joins: the earliest-free replica that has a row and KV room for it (max-min), or the next
        one in turn (round-robin)."""
        tokens = cs.batch_tokens(batch)
        if self.config.placement == "round_robin":
            ids = sorted(self.replicas)
            for _ in range(len(ids)):
                replica = self.replicas[ids[self._rr_cursor % len(ids)]]
                self._rr_cursor += 1
                if replica.id != exclude and cs.fits(replica, tokens, self.memory):
                    return replica
            return None
        for replica in self._index.earliest(8, now):
            if replica.id != exclude and cs.fits(replica, tokens, self.memory):
                return replica
        return None

    def _assign_row(self, batch: Batch, replica: ReplicaState, now: float, **kind) -> Assignment:
        start = max(replica.expected_free_at, now)
        self._hold_row(batch, replica)
        self._refresh_expected_free(replica, now)
        return Assignment(batch, replica.id, start, replica.expected_free_at, **kind)

    @staticmethod
    def _hold_row(batch: Batch, replica: ReplicaState) -> None:
        """Book a one-row lease on a replica: its row and its KV reservation (``_take`` undoes it)."""
        replica.inflight[batch.id] = batch
        replica.kv_tokens += cs.batch_tokens(batch)

    def _renew_or_move(self, batch: Batch, home: ReplicaState, now: float) -> Assignment:
        req = batch.requests[0]
        if not self.pool:
            there = self._continuous_target(batch, now, exclude=home.id)
            if there is not None and cs.should_move(self.time, req, home, there, self.config.move_margin):
                self._owner.pop(batch.id, None)
                self._take(home, batch.id)
                self._refresh_expected_free(home, now)
                req.kv_replica = None
                moved = self._make_batch([req], batch.steps)
                return self._assign_row(moved, there, now, moved_from=home.id)
        return Assignment(batch, home.id, now, now + batch.est_time, continues=True)

    def _renew_in_place(self, req: Request, replica: ReplicaState, now: float) -> None:
        """A lease ended with the request unfinished: its row keeps running there under a new lease at once;
        the next ``schedule`` announces it (or moves it)."""
        batch = self._make_batch([req], min(self.config.slice_len, req.remaining), fresh=False)
        self._hold_row(batch, replica)
        self._owner[batch.id] = replica.id
        self._batch_of[req.id] = batch.id
        self.running[req.id] = req
        self._boundary.append(batch)

    def _slice_batches(self, now: float, free: int) -> list[Batch]:
        cfg = self.config
        pool = list(self.pool.values())
        limit = free * cfg.max_batch_size
        # When the free slots can take the whole pool, the order cannot change who is chosen: rank lazily,
        # only if the DP makes more batches than there are slots.
        candidates = pool if len(pool) <= limit else select(pool, self.ordering, now, cfg.max_wait, limit=limit)
        plan = plan_batches(candidates, cfg.slice_len, self.time, self.memory, cfg.max_batch_size,
                            kv_kept=cfg.kv_reuse, costs=self._kept_shape_costs())
        groups = split_for_parallelism(
            plan.groups, min(self._index.idle, free),
            # a group is a run of the length-sorted candidates (or half of one): its last row is its longest
            lambda g: float(self.time.batch_time(len(g), g[-1].input_len, cfg.slice_len)),
        )
        if len(groups) > free:
            # Keep the groups holding the most urgent requests; the rest wait in the pool for the next round.
            if candidates is pool:
                candidates = select(pool, self.ordering, now, cfg.max_wait)
            rank = {r.id: i for i, r in enumerate(candidates)}
            groups = sorted(groups, key=lambda g: min(rank[r.id] for r in g))[:free]
        batches = [self._make_batch(g, cfg.slice_len) for g in groups]
        # A request near the end of its budget may not fit a full slice's memory but fits its last few steps.
        batches += [self._make_batch([r], r.remaining) for r in plan.unfit][:max(free - len(batches), 0)]
        return batches

    def _kept_shape_costs(self) -> ShapeCosts | None:
        """The DP's per-shape costs kept across rounds, while the estimators and settings stay the same
        (the dispatcher may swap in a new memory estimator); None where the estimators may change their
        answers (the live dispatcher's online latency estimator)."""
        cfg = self.config
        if not ShapeCosts.cacheable(self.time, self.memory):
            return None
        kept = self._shape_costs
        if kept is None or not kept.matches(self.time, self.memory, cfg.slice_len, cfg.max_batch_size):
            kept = self._shape_costs = ShapeCosts(self.time, self.memory, cfg.slice_len, cfg.max_batch_size)
        return kept

    def _static_batches(self, now: float, free: int) -> list[Batch]:
        cfg = self.config
        queue = select(list(self.pool.values()), self.ordering, now, cfg.max_wait,
                       limit=free * cfg.sls_batch_size)
        batches: list[Batch] = []
        while queue and len(batches) < free:
            group = queue[:cfg.sls_batch_size]
            # Shrink from the back until the static batch fits memory for its whole run.
            while len(group) > 1 and self.memory.max_batch_size(
                    max(r.input_len for r in group), max(r.remaining for r in group)) < len(group):
                group = group[:-1]
            queue = queue[len(group):]
            batches.append(self._make_batch(group, max(r.remaining for r in group)))
        return batches

    def _admissions(self, now: float, free: int) -> list[Batch]:
        chosen = select(list(self.pool.values()), self.ordering, now, self.config.max_wait, limit=free)
        return [self._make_batch([r], r.remaining) for r in chosen]

    def _cache_holder_costs(self, batch: Batch, holders: set[str]) -> dict[str, float]:
        """The replicas that keep some rows' KV caches (``holders``), and the batch's estimated time on each.

        Rows whose cache is kept there skip the re-prefill: their prefill shrinks to one token each, while the
        decode steps stay (every row still attends over its padded context).
        """
        requests, n = batch.requests, batch.size
        full_prefill = float(self.time.batch_time(n, batch.max_input_len, 0))
        # One pass for every holder at once (a batch is made for every slice of every request): the rows each
        # holder keeps, the longest row and its holder, and the longest row whose cache is not with that one.
        # On a holder other than the longest row's, that row is fresh, so it is the longest fresh row; on the
        # longest row's own holder, the longest fresh row is the other one.
        kept: dict[str | None, int] = {}
        longest, longest_at, runner_up = -1, None, 0
        for r in requests:
            at, length = r.kv_replica, r.prompt_len + r.generated
            kept[at] = kept.get(at, 0) + 1
            if length > longest:
                if at != longest_at and longest > runner_up:
                    runner_up = longest
                longest, longest_at = length, at
            elif at != longest_at and length > runner_up:
                runner_up = length
        costs = {}
        for holder in holders:
            if holder not in self.replicas:
                continue
            n_fresh = n - kept.get(holder, 0)
            if n_fresh:
                prefill = float(self.time.batch_time(n_fresh, runner_up if holder == longest_at else longest, 0))
            else:
                prefill = float(self.time.batch_time(n, 1, 0))
            costs[holder] = max(batch.est_time - full_prefill + prefill, 0.0)
        return costs

    def _make_batch(self, requests: list[Request], step_cap: int, fresh: bool = True) -> Batch:
        """``fresh``: (continuous slices) the row must be prefilled where it runs; False for a lease renewed on
        the replica that already holds the row."""
        # One pass over the rows for everything the estimates need (a batch is made for every slice of every
        # request; separate passes cost a tenth more).
        # Request.remaining and .predicted_remaining, inlined (two property calls per row were a fifth of this):
        # the most budget left, and the largest of min(max(predicted - generated, 1), max(budget left, 1)).
        most_left, most_predicted, holders = 0, 0.0, set()
        for r in requests:
            generated, budget = r.generated, r.max_tokens
            left = budget - generated
            if left > most_left:
                most_left = left
            predicted = (budget if r.predicted_len is None else r.predicted_len) - generated
            if predicted < 1.0:
                predicted = 1.0
            if predicted > left:
                predicted = left if left > 1 else 1
            if predicted > most_predicted:
                most_predicted = predicted
            holders.add(r.kv_replica)
        steps = min(step_cap, most_left)
        batch = Batch(id=f"{self.batch_prefix}{next(self._batch_ids)}", requests=list(requests), steps=steps)
        n, longest = batch.size, batch.max_input_len
        batch.est_bytes = float(self.memory.batch_bytes(n, longest, steps))
        if self.config.mode is Mode.CONTINUOUS_SLICES:
            batch.est_time = cs.row_work(self.time, requests[0], self.config.max_running, fresh=fresh)
            return batch
        # the ceiling of the largest prediction is the largest ceiling (one ceil instead of one per row)
        expected_steps = min(steps, math.ceil(most_predicted))
        batch.est_time = float(self.time.batch_time(n, longest, expected_steps))
        holders.discard(None)
        if self.config.kv_reuse and holders:
            batch.cheaper_on = self._cache_holder_costs(batch, holders)
        return batch

    # ---- results --------------------------------------------------------------------------------------
    def on_slice_done(self, result: SliceResult, now: float) -> list[Request]:
        """Apply a replica's result: finished requests are returned, unfinished ones rejoin the pool."""
        replica_id = self._owner.pop(result.batch_id, None)
        if replica_id is None or replica_id not in self.replicas:
            self.stats.stale_results += 1
            return []
        replica = self.replicas[replica_id]
        batch = self._take(replica, result.batch_id)
        replica.busy_time += result.elapsed
        self._refresh_expected_free(replica, now)
        self.stats.batches_completed += 1

        # Replicas report their rows in the batch's order (the simulated ones always do): read each row's
        # outcome by position, and only index them by id once one is out of place.
        outcomes = result.outcomes
        by_id = None if len(outcomes) == len(batch.requests) else {o.request_id: o for o in outcomes}
        finished: list[Request] = []
        tokens = 0
        continuing = 0
        renew = self.config.mode is Mode.CONTINUOUS_SLICES
        holder = replica_id if self.config.kv_reuse and replica.keeps_kv else None  # where unfinished rows' KV stays
        running, batch_of, pool, aborted = self.running, self._batch_of, self.pool, self._aborted
        for i, req in enumerate(batch.requests):
            rid = req.id
            running.pop(rid, None)
            batch_of.pop(rid, None)
            if by_id is None:
                outcome = outcomes[i]
                if outcome.request_id != rid:
                    by_id = {o.request_id: o for o in outcomes}
                    outcome = by_id.get(rid)
            else:
                outcome = by_id.get(rid)
            if aborted and rid in aborted:  # (an empty set is the rule: skip hashing the id)
                aborted.discard(rid)
                continue
            if outcome is None:  # the replica said nothing of it: serve it again, nothing was lost
                req.pool_since = now
                pool[rid] = req
                continuing += 1
                continue
            new = outcome.new_tokens
            tokens += new
            req.generated += new
            req.slices += 1
            if outcome.new_tokens > 0 and req.first_token_at is None:
                req.first_token_at = now
            reason = outcome.finish_reason
            final = reason.is_final
            if not final and req.generated >= req.max_tokens:  # no budget left
                reason, final = FinishReason.LENGTH, True
            if final:
                req.finish_reason = reason
                req.finished_at = now
                finished.append(req)
            elif renew:
                req.kv_replica = replica_id
                self._renew_in_place(req, replica, now)
                continuing += 1
            else:
                req.pool_since = now
                req.kv_replica = holder
                pool[rid] = req
                continuing += 1
        if renew:
            self._refresh_expected_free(replica, now)
        # every row's outcome in place: one outcome per row (distinct ids), as counted by id
        self.stats.rows_completed += len(outcomes) if by_id is None else len(by_id)
        self.stats.tokens_generated += tokens
        self.stats.requests_finished += len(finished)
        if continuing:
            self.stats.early_returns += len(finished)
        return finished

    # ---- views ----------------------------------------------------------------------------------------
    def owns(self, batch_id: str) -> bool:
        """Whether a result for this batch would be applied (False: stale or duplicate)."""
        return batch_id in self._owner

    def is_aborted(self, request_id: str) -> bool:
        return request_id in self._aborted

    @property
    def aborting(self) -> bool:
        """Whether any cancelled request is still running (its batch has not reported yet)."""
        return bool(self._aborted)

    def expected_completion(self) -> dict[str, float]:
        return {rid: r.expected_free_at for rid, r in self.replicas.items()}

    @property
    def pending(self) -> int:
        return len(self.pool) + len(self.running)

    # ---- internals ------------------------------------------------------------------------------------
    def _worst_case_shape(self, request: Request) -> tuple[int, int]:
        """(longest input, steps) of the largest single-row batch this request can ever be part of."""
        if self.config.mode in (Mode.SCLS, Mode.CONTINUOUS_SLICES):
            steps = min(self.config.slice_len, request.remaining)
            return request.prompt_len + request.max_tokens - steps, steps
        return request.input_len, request.remaining

    def _take(self, replica: ReplicaState, batch_id: str) -> Batch:
        """Remove a batch from a replica's books (and its KV reservation, in continuous slices)."""
        batch = replica.inflight.pop(batch_id)
        if self.config.mode is Mode.CONTINUOUS_SLICES:
            replica.kv_tokens -= cs.batch_tokens(batch)
        return batch

    def _return_batch(self, batch: Batch, now: float) -> list[Request]:
        returned = []
        for req in batch.requests:
            self.running.pop(req.id, None)
            self._batch_of.pop(req.id, None)
            if req.id in self._aborted:
                self._aborted.discard(req.id)
                continue
            req.pool_since = now
            self.pool[req.id] = req
            returned.append(req)
        return returned

    def _refresh_expected_free(self, replica: ReplicaState, now: float) -> None:
        """After a batch left the replica: re-estimate when it is free, and re-index it."""
        rid = replica.id
        left = sum(b.cheaper_on.get(rid, b.est_time) for b in replica.inflight.values())  # cost_on, inlined: hot
        if self.config.mode is Mode.ILS:  # requests share the continuous batch rather than queueing
            left /= max(self.config.ils_max_concurrency, 1)
        replica.expected_free_at = now + left
        self._index.update(replica)
