"""Discrete-event simulation of a Slicefleet cluster: the live dispatcher's core, simulated replicas, virtual
time.

The simulation is the dispatch core's second adapter (the live dispatcher is the first): it feeds the core the
same events (arrivals, slice results, cancellations, replicas lost) and carries out its commands against
simulated replicas. Nothing sleeps: events are popped from a heap in time order, and a scheduling round
(``tick``) runs at most every ``dispatch_interval``, as the live dispatcher's loop wakes up.

Faults (:class:`SimFault`) exercise what the core does when things go wrong: a replica killed stops reporting
and is presumed lost when its heartbeat would have expired (its requests go back to the pool and continue
elsewhere); a cancelled request is released where it runs and never finishes.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time as wallclock
from dataclasses import dataclass

from balancer.config import SchedulerConfig
from balancer.estimators import BilinearLatencyModel, MemoryEstimator
from balancer.types import FinishReason, Mode, Request, RequestOutcome, SliceResult
from cluster.dispatch_core import (Commit, CommitOutcome, Completed, DispatchCore, Finish, ForgetReplica, Post)
from cluster.messages import BatchOrder
from cluster.sim.gc_pause import gc_paused
from cluster.sim.replica import ContinuousReplica, SimulatedRequest, SliceReplica
from cluster.sim.report import RunReport, schedule_fingerprint, summarize
from cluster.sim.workload import SimRequest

MAX_LANES = 4
"""The continuous engine's lanes (``worker.continuous.MAX_LANES``; not imported: that module needs torch)."""

_DONE, _SEGMENT, _TICK, _FAULT, _LOST = 1, 2, 3, 4, 5

LOSS_DETECTED_AFTER = 4.0
"""Seconds from a replica's death to the dispatcher presuming it lost: the worker's heartbeat TTL
(``cluster.worker_replica.HEARTBEAT_TTL``; not imported: that module needs Ray)."""

DEFAULT_DISPATCH_INTERVAL = 0.05
"""Seconds between scheduling rounds: the live dispatcher's loop wakes about this often (its stream read
blocks 50 ms), taking every result that arrived since in one round."""

DEFAULT_KV_CACHE_TOKENS = 40_000
"""Tokens of KV cache a simulated replica keeps between slices: the HF engine's default 512 MiB at the
default model's 12 KiB per token."""


@dataclass(frozen=True)
class SimFault:
    """Something that goes wrong at virtual time ``at``: ``kill`` a replica (``target``: its id, e.g. ``sim-3``),
    or ``cancel`` a request (``target``: its id)."""

    at: float
    kind: str
    target: str

    def __post_init__(self) -> None:
        if self.kind not in ("kill", "cancel"):
            raise ValueError(f"unknown fault kind {self.kind!r}: expected kill or cancel")
        if self.at < 0:
            raise ValueError(f"a fault's time must be >= 0, got {self.at}")


@dataclass(slots=True)
class FinishedRecord:
    request: Request
    true_len: int


class Simulation:
    def __init__(self, config: SchedulerConfig, latency: BilinearLatencyModel, memory: MemoryEstimator,
                 workload: list[SimRequest], replicas: int, progress: bool = False,
                 kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS,
                 dispatch_interval: float = DEFAULT_DISPATCH_INTERVAL, faults: list[SimFault] = ()):
        if replicas < 1:
            raise ValueError("need at least one replica")
        self.config = config
        self.latency = latency
        self.workload = workload
        self.core = DispatchCore(config, latency, memory)
        self.core.start(epoch=1)
        self.scheduler = self.core.scheduler
        self.continuous = config.mode in (Mode.ILS, Mode.CONTINUOUS_SLICES)
        if self.continuous:
            self.replicas = {f"sim-{i}": ContinuousReplica(f"sim-{i}", latency, max_lanes=MAX_LANES)
                             for i in range(replicas)}
        else:
            keep = kv_cache_tokens if config.kv_reuse and config.mode is Mode.SCLS else 0
            self.replicas = {f"sim-{i}": SliceReplica(f"sim-{i}", latency, keep)
                             for i in range(replicas)}
        for rid, replica in self.replicas.items():
            self.core.on_replica_joined(rid, 0.0, keeps_kv=self.continuous or replica.kv_cache_tokens > 0)
        self.faults = sorted(faults, key=lambda f: f.at)
        unknown = {f.target for f in self.faults if f.kind == "kill"} - self.replicas.keys()
        if unknown:
            raise ValueError(f"no such replica to kill: {sorted(unknown)} (replicas are sim-0 .. sim-{replicas - 1})")
        self.dead: set[str] = set()
        self.cancelled: list[str] = []
        # Ids of finished requests, kept only when a cancellation may come after its request finished (which
        # cancels nothing): without cancellations it would be a million-entry set for no use.
        self._finished_ids: set[str] | None = set() if any(f.kind == "cancel" for f in self.faults) else None
        self.progress = progress
        self.dispatch_interval = dispatch_interval
        self._next_round = 0.0
        self._tick_pending = False
        self.finished: list[FinishedRecord] = []
        self.rejected: list[str] = []
        self._events: list = []
        self._seq = itertools.count()
        self._rows = 0
        self._batches = 0

    def _push(self, t: float, kind: int, payload) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def run(self) -> RunReport:
        with gc_paused():
            return self._run()

    def _run(self) -> RunReport:
        started = wallclock.perf_counter()
        # Arrivals are known up front: they wait in a sorted list rather than in the event heap, which then holds
        # only what is in flight (a few events per replica, not a million requests). They keep the order the
        # heap gave them: by time, in workload order (a stable sort), and ahead of every other event of the
        # same instant (they were pushed first, so their sequence numbers were the smallest).
        arrivals = sorted(self.workload, key=lambda r: r.arrival)
        times = [r.arrival for r in arrivals]
        times.append(math.inf)  # after the last arrival: no arrival is next
        arrived, events = 0, self._events
        for fault in self.faults:
            self._push(fault.at, _FAULT, fault)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.workload), desc=f"simulate {self.config.mode.value}", unit="req")
        while arrived < len(arrivals) or events:
            now = times[arrived] if not events or times[arrived] <= events[0][0] else events[0][0]
            while times[arrived] == now and arrived < len(arrivals):
                self._arrive(arrivals[arrived], now)
                arrived += 1
            while events and events[0][0] == now:
                _, _, kind, payload = heapq.heappop(events)
                done_before = len(self.finished)
                self._handle(kind, payload, now)
                if bar is not None:
                    bar.update(len(self.finished) - done_before)
            if now + 1e-12 >= self._next_round:
                self._round(now)
            elif not self._tick_pending:
                self._push(self._next_round, _TICK, None)
                self._tick_pending = True
        if bar is not None:
            bar.close()
        return self._report(wallclock.perf_counter() - started)

    def _round(self, now: float) -> None:
        """One scheduling round, like one pass of the live dispatcher's loop."""
        self._next_round = now + self.dispatch_interval
        self._carry_out(self.core.tick(now), now)

    def _carry_out(self, commands: list, now: float) -> None:
        """Do what the core asks of the cluster, as the live dispatcher does against Redis."""
        for cmd in commands:
            kind = type(cmd)
            if kind is Post:
                self._post(cmd, now)
            elif kind is Commit:  # the simulated store has no tokens to write: every commit applies
                self._carry_out(self.core.on_committed(cmd, CommitOutcome.APPLIED, now), now)
            elif kind is Completed:
                self.finished += [FinishedRecord(r, r.true_len) for r in cmd.requests]
                if self._finished_ids is not None:
                    self._finished_ids.update(r.id for r in cmd.requests)
            elif kind is Finish:
                if cmd.status == "error":
                    self.rejected.append(cmd.request_id)
                elif self._finished_ids is None or cmd.request_id not in self._finished_ids:
                    self.cancelled.append(cmd.request_id)
            elif kind is ForgetReplica:
                self.dead.add(cmd.replica_id)

    def _post(self, cmd: Post, now: float) -> None:
        replica = self.replicas[cmd.replica_id]
        order = cmd.message
        if type(order) is not BatchOrder:  # a release
            for rid in order.request_ids:
                replica.release(rid)
            if self.continuous:
                for rid, lease in order.close.items():  # a cancelled row: the replica reports its lease closed
                    self._apply(SliceResult(lease, replica.id, [RequestOutcome(rid, 0, FinishReason.ABORTED)], 0.0),
                                now)
            return
        if not order.continues:
            self._batches += 1
            self._rows += len(order.request_ids)
        replica.submit(cmd.batch)
        if replica.id in self.dead:
            return  # killed: it takes the order and never runs it (the loss returns it to the pool)
        if order.continues:  # a renewed lease may be due at once (the row decoded past it meanwhile)
            for result in replica.due():
                self._apply(result, now)
        self._kick(replica, now)

    def _arrive(self, r: SimRequest, now: float) -> None:
        req = SimulatedRequest(r.id, r.prompt_len, self.config.max_gen_len, r.arrival, predicted_len=r.predicted_len)
        req.true_len = r.output_len
        self._carry_out(self.core.on_arrival(req, now), now)

    def _handle(self, kind: int, payload, now: float) -> None:
        if kind == _TICK:
            self._tick_pending = False
        elif kind == _DONE:
            replica, result = payload
            if replica.id in self.dead:
                return
            replica.finish_running()
            self._apply(result, now)
            self._kick(replica, now)
        elif kind == _SEGMENT:
            replica = self.replicas[payload]
            if replica.id in self.dead:
                return
            for result in replica.leave():
                self._apply(result, now)
            self._kick(replica, now)
        elif kind == _FAULT:
            self._fault(payload, now)
        else:  # _LOST: the dead replica's heartbeat has expired
            self._carry_out(self.core.on_replica_lost(payload, now), now)

    def _fault(self, fault: SimFault, now: float) -> None:
        if fault.kind == "cancel":
            self._carry_out(self.core.on_cancel(fault.target), now)
        elif fault.target not in self.dead:
            self.dead.add(fault.target)  # it stops now; what it was running never reports
            self._push(now + LOSS_DETECTED_AFTER, _LOST, fault.target)

    def _kick(self, replica, now: float) -> None:
        """Start work on an idle replica."""
        if not self.continuous:
            result = replica.start_next()
            if result is not None:
                self._push(now + result.elapsed, _DONE, (replica, result))
        elif replica.idle:
            end = replica.run_segment(now)
            if end is not None:
                self._push(end, _SEGMENT, replica.id)

    def _apply(self, result: SliceResult, now: float) -> None:
        self._carry_out(self.core.on_slice(result, 1, now), now)

    def _report(self, wall: float) -> RunReport:
        reqs = [f.request for f in self.finished]
        ils = self.continuous
        pad = sum(r.pad_tokens for r in self.replicas.values())
        invalid = sum(r.invalid_tokens for r in self.replicas.values())
        if ils:
            rows = sum(r.row_iterations for r in self.replicas.values())
            batches = sum(r.iterations for r in self.replicas.values())
            early = sum(r.early_returns for r in self.replicas.values())
        else:
            rows, batches, early = self._rows, self._batches, self.scheduler.stats.early_returns
        return summarize(
            mode=self.config.mode.value,
            replicas=len(self.replicas),
            arrivals=[r.arrival for r in reqs],
            finishes=[r.finished_at for r in reqs],
            first_tokens=[r.first_token_at if r.first_token_at is not None else r.finished_at for r in reqs],
            useful=sum(r.generated for r in reqs),
            pad=pad,
            invalid=invalid,
            reprefill=0 if ils else sum(r.reprefill_tokens for r in self.replicas.values()),
            rows=rows,
            batches=batches,
            busy=[r.busy_time for r in self.replicas.values()],
            early_returns=early,
            slices=sum(r.slices for r in reqs),
            extra={"wall_seconds": wall, "rejected": len(self.rejected), "cancelled": len(self.cancelled),
                   "replicas_lost": self.core.counters.replicas_lost,
                   "requests_requeued": self.core.counters.requests_requeued,
                   "schedule_sha256": schedule_fingerprint((r.id, r.finished_at) for r in reqs),
                   "kv_reused_rows": sum(getattr(r, "kv_reused_rows", 0) for r in self.replicas.values())},
        )


def simulate(config: SchedulerConfig, latency: BilinearLatencyModel, memory: MemoryEstimator,
             workload: list[SimRequest], replicas: int, progress: bool = False,
             kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS,
             dispatch_interval: float = DEFAULT_DISPATCH_INTERVAL,
             faults: list[SimFault] = ()) -> tuple[RunReport, Simulation]:
    sim = Simulation(config, latency, memory, workload, replicas, progress, kv_cache_tokens, dispatch_interval,
                     faults)
    return sim.run(), sim
