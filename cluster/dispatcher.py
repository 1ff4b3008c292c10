"""The dispatcher: the balancer's Scheduler, fed from Redis, with wall-clock time.

One loop in one thread: take new requests, cancellations and slice results from their streams, apply
results (once, atomically, in Redis), watch replica heartbeats, ask the scheduler for a plan, post each
batch to its replica's stream, publish a metrics snapshot. All state it needs survives in Redis: a restarted
dispatcher starts a new epoch (batches of the old one are ignored wherever they turn up), rebuilds its pool
from the live set, and carries on.
"""

from __future__ import annotations

import logging
import threading
import time

from balancer.estimators import LinearKVMemory
from balancer.scheduler import Scheduler, UnservableRequest
from balancer.types import FinishReason, Request, RequestOutcome, SliceResult
from cluster.config import SlicefleetConfig
from cluster.messages import BatchOrder, Progress, Release, ResultMessage, SliceReport, WorkMessage
from cluster.metrics import REQUEST_LATENCY_BUCKETS, SnapshotHistogram
from cluster.state import STORE_UNAVAILABLE, RequestRecord, StateStore

log = logging.getLogger("slicefleet.dispatcher")

REPLICA_CHECK_EVERY = 0.5
LOSS_GRACE_AFTER_OUTAGE = 10.0
"""Seconds after Redis comes back during which no replica is presumed dead. A Redis restart (or an outage
longer than the heartbeat TTL) lets every heartbeat key expire while the replicas are fine; they beat again
within a second, and forgetting them meanwhile would delete their work streams and restart every worker."""
METRICS_EVERY = 1.0
BATCH_TIMEOUT_FACTOR = 5.0
BATCH_TIMEOUT_SLACK = 30.0
"""A batch with no result by expected finish + 5 x (expected finish - dispatch) + 30 s is re-placed."""


def to_request(rec: RequestRecord, generated: int, max_gen_len: int) -> Request:
    return Request(rec.id, rec.prompt_len, min(rec.max_tokens, max_gen_len), rec.arrival,
                   predicted_len=rec.predicted_len, generated=generated, slices=rec.slices, priority=rec.priority)


def slice_result(msg: SliceReport) -> SliceResult:
    return SliceResult(
        batch_id=msg.batch_id,
        replica_id=msg.replica_id,
        # new_tokens counts a continuous-batching row's tokens already published as progress too
        outcomes=[RequestOutcome(o.id, o.new_tokens, FinishReason(o.finish)) for o in msg.outputs],
        elapsed=msg.elapsed,
        prefill_time=msg.prefill_time,
        decode_step_times=list(msg.decode_step_times),
        pad_tokens=msg.pad_tokens,
        invalid_tokens=msg.invalid_tokens,
        reprefill_tokens=msg.reprefill_tokens,
        kv_reused=msg.kv_reused,
    )


class DispatcherCore:
    """Everything but the Ray wrapper, so it can run in a test or a plain process too."""

    def __init__(self, cfg: SlicefleetConfig, latency, memory: LinearKVMemory, store: StateStore):
        self.cfg = cfg
        self.store = store
        self.latency = latency
        self.scheduler = Scheduler(cfg.scheduler.to_balancer(kv_reuse=cfg.engine.kv_reuse), latency, memory)
        self.counters = {"slices_run": 0, "batches_run": 0, "rows_run": 0, "requests_finished": 0,
                         "stale_results": 0, "tokens_generated": 0, "pad_tokens": 0, "invalid_tokens": 0,
                         "reprefill_tokens": 0, "kv_reused_batches": 0, "early_returns": 0,
                         "predicted_slice_seconds_sum": 0.0, "actual_slice_seconds_sum": 0.0,
                         "abs_pct_error_sum": 0.0, "slices_estimated": 0, "replicas_lost": 0, "batches_timed_out": 0,
                         "moves": 0, "requests_requeued": 0}
        self.queue_time = SnapshotHistogram(REQUEST_LATENCY_BUCKETS)
        self._arrivals: dict[str, float] = {}  # request id -> arrival, until its first placement (queue time)
        # batch id -> (estimated seconds on its replica, when to give up waiting for its result)
        self._placed: dict[str, tuple[float, float]] = {}
        self._budgets: dict[str, float] = {}  # replica id -> KV bytes it reported
        self._posts: list[tuple[str, dict]] | None = None  # work-stream posts of the round being planned
        self.continuous = cfg.scheduler.mode in ("continuous_slices", "ils")
        """Replicas run one continuous batch: cancelled rows are released at once, results carry no batch shape."""
        self._stop = threading.Event()
        self._store_back_at = 0.0  # when Redis last answered again after failing (replica-loss grace)
        self._store_down = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.epoch = 0
        self.started = False
        self.fenced = False
        """A newer dispatcher took over this Redis (a NewCluster upgrade, a second cluster): this one stays
        alive but reads, places and publishes nothing (if it died, its restart would fence the new one)."""

    # ---- start-up ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.epoch = self.store.new_epoch()
        self.scheduler.batch_prefix = f"e{self.epoch}.b"  # never reuse an earlier incarnation's batch ids
        self.store.ensure_dispatch_groups()
        self._rebuild()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()
        self.started = True

    def _rebuild(self) -> None:
        """Every unfinished request in Redis rejoins the pool with the tokens it already has."""
        restored = self._admit_live(self.store.live_ids(), time.time())
        log.info("dispatcher epoch %d: restored %d unfinished requests from Redis", self.epoch, restored)

    def _admit_live(self, rids: list[str], now: float) -> int:
        """Admit the requests among ``rids`` that are still unfinished in Redis and not held here already;
        returns how many."""
        held = self.scheduler.pool.keys() | self.scheduler.running.keys()
        rids = [rid for rid in rids if rid not in held]
        admitted = 0
        for rec, gen in self.store.records(rids):
            if rec is not None and rec.status != "done":
                self._admit(rec, len(gen), now)
                admitted += 1
        return admitted

    def _admit(self, rec: RequestRecord, generated: int, now: float) -> None:
        try:
            self.scheduler.add_request(to_request(rec, generated, self.cfg.scheduler.max_gen_len), now)
        except UnservableRequest as exc:
            log.warning("refusing %s: %s", rec.id, exc)
            self.store.finish(rec.id, "error")
        except ValueError as exc:  # already in the pool (announced twice across a restart)
            log.debug("ignoring %s: %s", rec.id, exc)
        else:
            if generated == 0:
                self._arrivals[rec.id] = rec.arrival

    # ---- loop ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        last_replicas = last_metrics = 0.0
        while not self._stop.is_set():
            try:
                self._step_streams()
                now = time.time()
                if self._store_down:
                    self._store_down, self._store_back_at = False, now
                    # An announcement read just before the outage may never have been admitted (the read
                    # succeeded, the rest of the round failed): the live set still has it.
                    while self._step_streams(pending=True):  # a slice result read then would wait for its
                        pass                                    # batch's timeout (30 s) otherwise
                    found = self._admit_live(self.store.live_ids(), now)
                    log.info("Redis answers again: %d unfinished requests found in the live set and not held here "
                             "were admitted; replicas get %.0f s to beat before any is presumed lost", found,
                             LOSS_GRACE_AFTER_OUTAGE)
                # Every round, not every replica check: until it notices, a superseded dispatcher reads (from
                # the one consumer group) announcements and results that are its successor's.
                if self._superseded():
                    self._stop.wait()  # fenced: idle until stopped, and healthy (see ``fenced``)
                    return
                if now - last_replicas >= REPLICA_CHECK_EVERY:
                    self._check_replicas(now)
                    self._expire_batches(now)
                    last_replicas = now
                self._dispatch(time.time())
                if now - last_metrics >= METRICS_EVERY:
                    self.store.publish_metrics(self.snapshot(now))
                    last_metrics = now
            except STORE_UNAVAILABLE as exc:
                log.warning("Redis unavailable (%s); retrying", exc)
                self._store_down = True
                time.sleep(0.5)
            except Exception as exc:  # a bug: surface it through health checks so Serve restarts us
                log.exception("dispatcher loop failed")
                self._error = exc
                return

    def _superseded(self) -> bool:
        """Whether a newer epoch exists; if so, hand every request this dispatcher holds to its successor.

        The successor restored every unfinished request when it started, but requests that arrived after that
        and were read by this one would otherwise wait forever: announcing them again lets it admit them (it
        ignores those it already has)."""
        current = self.store.epoch()
        if current <= self.epoch:
            return False
        held = sorted(set(self.scheduler.pool) | set(self.scheduler.running))
        self.store.announce(held)
        self.fenced = True
        log.warning("dispatcher epoch %d superseded by epoch %d (another dispatcher started on this Redis): handed "
                    "its %d requests over and stopped dispatching", self.epoch, current, len(held))
        return True

    def _step_streams(self, pending: bool = False) -> bool:
        """One read of the three streams and what it brings; ``pending``: instead, the entries delivered to this
        consumer but never acknowledged (a round cut short by a Redis error). Returns whether any came."""
        batches = self.store.read_dispatch(pending=pending)
        now = time.time()
        for name, ids, payloads in batches:
            if name == "incoming":
                self._admit_live(payloads, now)
            elif name == "cancel":
                for rid in payloads:
                    self._cancel(rid)
            else:
                for msg in payloads:
                    if msg.epoch > self.epoch:
                        # A newer dispatcher's batch reported before this one noticed it was superseded: put it
                        # back on the stream for that dispatcher (dropped as stale, its batch would wait 30 s).
                        self.store.post_result(msg)
                    else:
                        self._apply(msg, now)
            self.store.ack_dispatch(name, ids)
        return bool(batches)

    def _cancel(self, rid: str) -> None:
        replica_id, batch_id = self.scheduler.replica_of(rid), self.scheduler.batch_of(rid)
        holder = self.scheduler.pool[rid].kv_replica if rid in self.scheduler.pool else None
        self._arrivals.pop(rid, None)
        if self.scheduler.abort(rid):
            log.info("cancelled %s", rid)
            if replica_id is not None and self.continuous:
                # The row stops decoding now; the replica closes its lease so the scheduler frees the row.
                self._release(replica_id, [rid], {rid: batch_id})
            elif (replica_id or holder) in self.scheduler.replicas:
                self._release(replica_id or holder, [rid])  # free the KV cache kept there after its slice
        rec = self.store.record(rid)
        if rec is not None and rec.status != "done":
            self.store.finish(rid, "cancelled")

    def _release(self, replica_id: str, rids: list[str], close: dict[str, str] | None = None) -> None:
        """Tell a replica to free what it holds for ``rids`` (a running row, or a KV cache kept after a slice);
        ``close``: request id -> the lease to report closed (a cancellation)."""
        self._post(replica_id, Release(rids, self.epoch, close or {}))

    def _post(self, replica_id: str, message: WorkMessage) -> None:
        """Post to a replica's work stream: batched with the round's other posts while a round is planned."""
        if self._posts is not None:
            self._posts.append((replica_id, message))
        else:
            self.store.post_batch(replica_id, message)

    def _apply(self, msg: ResultMessage, now: float) -> None:
        if isinstance(msg, Progress):  # tokens of rows still running, streamed before their slice ends
            outcomes = [(o.id, o.tokens, "", o.at) for o in msg.outputs
                        if o.epoch == self.epoch and self.scheduler.owns(o.batch_id)
                        and not self.scheduler.is_aborted(o.id)]
            if outcomes and self.store.apply_result(None, msg.replica_id, outcomes, slice_end=False) == 2:
                log.warning("progress from %s skipped: tokens before it are missing", msg.replica_id)
            return
        batch_id = msg.batch_id
        if msg.epoch != self.epoch or not self.scheduler.owns(batch_id):
            self.counters["stale_results"] += 1
            return
        result = slice_result(msg)
        # Aborted rows (cancelled, or gone from Redis) only close the scheduler's bookkeeping.
        outcomes = [(o.id, o.tokens, "" if o.finish == FinishReason.SLICE_END.value else o.finish, o.at)
                    for o in msg.outputs
                    if not self.scheduler.is_aborted(o.id) and o.finish != FinishReason.ABORTED.value]
        status = self.store.apply_result(batch_id, result.replica_id, outcomes) if outcomes else 1
        if status != 1:
            # 0: Redis already holds this batch's tokens, so our counts are behind; 2: some tokens before these
            # never arrived. Either way start its requests again from what Redis has (workers read it).
            log.error("batch %s %s; re-queueing its requests", batch_id,
                      "was already applied" if status == 0 else "left a gap")
            returned = self.scheduler.requeue(batch_id, now)
            self.counters["requests_requeued"] += len(returned)
            if self.continuous and returned:
                self._release(result.replica_id, [r.id for r in returned])
            return
        finished = self.scheduler.on_slice_done(result, now)
        self._account(batch_id, msg, result, finished)

    def _account(self, batch_id: str, msg: SliceReport, result: SliceResult, finished: list[Request]) -> None:
        c = self.counters
        c["slices_run"] += len(result.outcomes)
        c["batches_run"] += 1
        c["rows_run"] += len(result.outcomes)
        c["requests_finished"] += len(finished)
        c["tokens_generated"] += sum(o.new_tokens for o in result.outcomes)
        c["pad_tokens"] += result.pad_tokens
        c["invalid_tokens"] += result.invalid_tokens
        c["reprefill_tokens"] += result.reprefill_tokens
        c["kv_reused_batches"] += int(result.kv_reused)
        if len(finished) < len(result.outcomes):
            c["early_returns"] += len(finished)
        est, _ = self._placed.pop(batch_id, (None, None))
        if est is not None and result.elapsed > 0 and not self.continuous:
            # Prediction error only where a batch's length is bounded by the slice: an SLS batch runs to its
            # longest member, which no estimate made at dispatch knows.
            if self.cfg.scheduler.mode == "scls":
                c["predicted_slice_seconds_sum"] += est
                c["actual_slice_seconds_sum"] += result.elapsed
                c["abs_pct_error_sum"] += abs(est - result.elapsed) / result.elapsed
                c["slices_estimated"] += 1
            if msg.n:
                self._observe_timing(msg, result)

    def _observe_timing(self, msg: SliceReport, result: SliceResult) -> None:
        """Refit the latency model online, and log the timing so a profile can be refit offline from it."""
        n, max_input_len = msg.n, msg.max_input_len
        if hasattr(self.latency, "observe_result"):
            steps = len(result.decode_step_times) or max((o.new_tokens for o in result.outcomes), default=0)
            self.latency.observe_result(result, n=n, max_input_len=max_input_len, steps=steps)
        self.store.log_slice({"n": n, "max_input_len": max_input_len, "resumed_rows": msg.resumed_rows,
                              "prefill_time": result.prefill_time, "decode_step_times": result.decode_step_times,
                              "elapsed": result.elapsed, "replica_id": result.replica_id})

    def _check_replicas(self, now: float) -> None:
        alive, dead = self.store.replicas_alive()
        if now - self._store_back_at < LOSS_GRACE_AFTER_OUTAGE:
            dead = []
        for rid in dead:
            returned = self.scheduler.remove_replica(rid, now)
            self.store.forget_replica(rid)
            self.counters["replicas_lost"] += 1
            self.counters["requests_requeued"] += len(returned)
            self._budgets.pop(rid, None)
            log.warning("replica %s stopped beating: %d requests back to the pool", rid, len(returned))
        for rid in alive:
            if rid not in self.scheduler.replicas:
                info = self.store.replica_info(rid)
                keeps = info.keeps_kv if info is not None else False
                self.scheduler.add_replica(rid, now, keeps_kv=keeps)
                self._fit_memory_to(info)
                log.info("replica %s joined (%s KV caches between slices)", rid, "keeps" if keeps else "keeps no")

    def _fit_memory_to(self, info) -> None:
        """Batches must fit the smallest replica: the KV budget is the least that any live replica reports."""
        if info is None or not info.kv_budget_bytes:
            return
        self._budgets[info.id] = float(info.kv_budget_bytes)
        self._apply_budget()

    def _apply_budget(self) -> None:
        live = [b for rid, b in self._budgets.items() if rid in self.scheduler.replicas]
        memory = self.scheduler.memory
        if live and min(live) != memory.budget_bytes:
            self.scheduler.memory = LinearKVMemory(memory.bytes_per_token, min(live))
            log.info("KV budget per batch: %.1f MiB (least of %d replicas)", min(live) / 2**20, len(live))

    def _expire_batches(self, now: float) -> None:
        """Re-place batches whose results are long overdue (a lost message, a hung replica).

        A live replica's result that turns up later is stale and ignored, so nothing runs twice into Redis.
        """
        for batch_id, (_, deadline) in list(self._placed.items()):
            if not self.scheduler.owns(batch_id):  # answered late, or re-placed after its replica died
                del self._placed[batch_id]
            elif now > deadline:
                del self._placed[batch_id]
                returned = self.scheduler.requeue(batch_id, now)
                self.counters["batches_timed_out"] += 1
                self.counters["requests_requeued"] += len(returned)
                log.warning("batch %s overdue: %d requests back to the pool", batch_id, len(returned))

    def _dispatch(self, now: float) -> None:
        self._posts: list[tuple[str, dict]] = []
        try:
            self._plan(now)
        finally:
            if self._posts:  # every placement of the round in one round trip
                self.store.post_batches(self._posts)
            self._posts = None

    def _plan(self, now: float) -> None:
        for a in self.scheduler.schedule(now):
            b = a.batch
            # Generous: the estimate can be off several times over while the online fit warms up.
            deadline = a.expected_finish + BATCH_TIMEOUT_FACTOR * (a.expected_finish - now) + BATCH_TIMEOUT_SLACK
            self._placed[b.id] = (a.expected_finish - a.expected_start, deadline)
            for r in b.requests:
                arrival = self._arrivals.pop(r.id, None)
                if arrival is not None:  # its first placement: the wait vLLM calls queue time ends here
                    self.queue_time.observe(max(now - arrival, 0.0))
            if a.moved_from is not None:
                self.counters["moves"] += 1
                self._release(a.moved_from, b.request_ids)
            elif not self.continuous:  # caches kept where earlier slices ran, and no use any more
                for holder in {r.kv_replica for r in b.requests} - {a.replica_id, None}:
                    if holder in self.scheduler.replicas:
                        self._release(holder, [r.id for r in b.requests if r.kv_replica == holder])
            self._post(a.replica_id, BatchOrder(b.id, self.epoch, b.steps, b.request_ids, continues=a.continues))

    # ---- views ---------------------------------------------------------------------------------------
    def snapshot(self, now: float) -> dict:
        s = self.scheduler
        c = self.counters
        batches = max(c["batches_run"], 1)
        replica_ids = sorted(s.replicas)
        busy = self.store.busy_seconds(replica_ids) if replica_ids else {}
        return {
            "time": now,
            "epoch": self.epoch,
            "fenced": int(self.fenced),
            "mode": self.cfg.scheduler.mode,
            "pool_depth": len(s.pool),
            "running": len(s.running),
            "backlog_seconds": self.backlog_seconds(now),
            "batch_size_mean": c["rows_run"] / batches,
            "slice_time_mape": c["abs_pct_error_sum"] / c["slices_estimated"] if c["slices_estimated"] else 0.0,
            **c,
            "preemptions": c["moves"] + c["requests_requeued"],
            "queue_time": self.queue_time.to_json(),
            "replicas": {rid: {"expected_completion_s": s.replicas[rid].outstanding(now),
                               "busy_seconds": busy.get(rid, 0.0),
                               "inflight_batches": len(s.replicas[rid].inflight),
                               "running_requests": sum(b.size for b in s.replicas[rid].inflight.values()),
                               "kv_usage": self._kv_usage(rid)} for rid in replica_ids},
        }

    def _kv_usage(self, replica_id: str) -> float:
        """KV cache reserved on a replica over its budget. Continuous batches hold all their rows at once; a
        static-batch replica runs its queued batches one after another, so only the largest counts."""
        batches = self.scheduler.replicas[replica_id].inflight.values()
        reserved = (sum if self.continuous else lambda xs: max(xs, default=0.0))([b.est_bytes for b in batches])
        budget = self._budgets.get(replica_id) or self.scheduler.memory.budget_bytes
        return float(reserved) / budget if budget > 0 else 0.0

    def backlog_seconds(self, now: float) -> float:
        """Predicted seconds until the replicas could start a request arriving now."""
        s = self.scheduler
        if not s.replicas:
            return float("inf") if s.pool else 0.0
        waiting = sum(s.service_time(r) for r in s.pool.values())
        placed = sum(r.outstanding(now) for r in s.replicas.values())
        return (waiting / max(self.cfg.scheduler.max_batch_size, 1) + placed) / len(s.replicas)


def build_estimators(cfg: SlicefleetConfig):
    """The latency model (profile, refit online) and the KV memory model for the configured model."""
    from transformers import AutoConfig

    from predictor.latency import OnlineLatencyEstimator, load_profile
    from predictor.memory import memory_estimator
    from worker.make_model import ensure_default_model

    model_dir = cfg.model.path or str(ensure_default_model())
    latency = OnlineLatencyEstimator(load_profile(cfg.predictor.latency_profile))
    # The dispatcher has no GPU: it starts from the configured (or CPU default) budget and lowers it to
    # what each replica measures when it registers.
    memory = memory_estimator(AutoConfig.from_pretrained(model_dir), dtype=cfg.model.dtype, device="cpu",
                              budget_bytes=cfg.engine.kv_budget_bytes)
    return latency, memory


class Dispatcher:
    """The Ray Serve deployment class (wrapped with ``serve.deployment`` in ``cluster.app``)."""

    def __init__(self, config: dict):
        cfg = SlicefleetConfig.model_validate(config)
        latency, memory = build_estimators(cfg)
        store = StateStore.connect(cfg.redis)
        self.core = DispatcherCore(cfg, latency, memory, store)
        self.core.start()

    def ready(self) -> bool:
        return self.core.healthy and not self.core.fenced

    def check_health(self) -> None:
        if not self.core.healthy:
            raise RuntimeError(f"dispatcher loop stopped: {self.core._error!r}")

    def snapshot(self) -> dict:
        return self.core.snapshot(time.time())

    def __del__(self):
        self.core.stop()
