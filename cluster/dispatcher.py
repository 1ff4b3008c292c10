"""The dispatcher: the dispatch core (:mod:`cluster.dispatch_core`), fed from Redis, with wall-clock time.

One loop in one thread: take new requests, cancellations and slice results from their streams and hand them
to the core as events; carry out the commands it returns (commit a slice's tokens once, atomically, in Redis;
post batch orders and releases to the replicas' streams); watch replica heartbeats; publish a metrics
snapshot. All state it needs survives in Redis: a restarted
dispatcher starts a new epoch (batches of the old one are ignored wherever they turn up), rebuilds its pool
from the live set, and carries on.
"""

from __future__ import annotations

import logging
import threading
import time

from balancer.estimators import LinearKVMemory
from balancer.splits import compile_now
from balancer.types import FinishReason, Request, RequestOutcome, SliceResult
from cluster.config import SlicefleetConfig
from cluster.dispatch_core import (LOSS_GRACE_AFTER_OUTAGE, Command, Commit, CommitOutcome, CommitProgress,
                                   DispatchCore, Finish, ForgetReplica, HandOver, LogTiming, Post, Repost)
from cluster.messages import DispatchCounters, MetricsSnapshot, Progress, RequestRecord, SliceReport, WorkMessage
from cluster.stores.base import STORE_UNAVAILABLE
from cluster.stores.dispatcher import DispatcherStore

log = logging.getLogger("slicefleet.dispatcher")

REPLICA_CHECK_EVERY = 0.5
METRICS_EVERY = 1.0


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


class DispatchLoop:
    """The Redis adapter around :class:`DispatchCore`: reads the streams, feeds the events in, carries the
    commands out. Everything but the Ray wrapper, so it can run in a test or a plain process too."""

    def __init__(self, cfg: SlicefleetConfig, latency, memory: LinearKVMemory, store: DispatcherStore):
        self.cfg = cfg
        self.store = store
        self.core = DispatchCore(cfg.scheduler.to_balancer(kv_reuse=cfg.engine.kv_reuse), latency, memory)
        self._posts: list[tuple[str, WorkMessage]] | None = None  # work-stream posts of the round being planned
        self._stop = threading.Event()
        self._store_down = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        """What stopped the loop (a bug): health checks fail with it, so Serve restarts the dispatcher."""
        self.started = False

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def counters(self) -> DispatchCounters:
        return self.core.counters

    @property
    def epoch(self) -> int:
        return self.core.epoch

    @property
    def fenced(self) -> bool:
        """A newer dispatcher took over this Redis (a NewCluster upgrade, a second cluster): this one stays
        alive but reads, places and publishes nothing (if it died, its restart would fence the new one)."""
        return self.core.fenced

    # ---- start-up ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.core.start(self.store.new_epoch())
        self.store.ensure_dispatch_groups()
        restored = self._admit_live(self.store.live_ids(), time.time())
        log.info("dispatcher epoch %d: restored %d unfinished requests from Redis", self.epoch, restored)
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()
        self.started = True

    def _admit_live(self, rids: list[str], now: float) -> int:
        """Admit the requests among ``rids`` that are still unfinished in Redis and not held here already;
        returns how many."""
        rids = [rid for rid in rids if not self.core.holds(rid)]
        admitted = 0
        for rec, gen in self.store.records(rids):
            if rec is not None and rec.status != "done":
                self._carry_out(self.core.on_arrival(to_request(rec, len(gen), self.cfg.scheduler.max_gen_len), now),
                                now)
                admitted += 1
        return admitted

    # ---- loop ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        last_replicas = last_metrics = 0.0
        while not self._stop.is_set():
            try:
                self._step_streams()
                now = time.time()
                if self._store_down:
                    self._store_down = False
                    self.core.on_store_back(now)
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
                self._carry_out(self.core.on_epoch(self.store.epoch()), now)
                if self.fenced:
                    self._stop.wait()  # idle until stopped, and healthy (see ``fenced``)
                    return
                if now - last_replicas >= REPLICA_CHECK_EVERY:
                    self._check_replicas(now)
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
                self.error = exc
                return

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
                    self._carry_out(self.core.on_cancel(rid), now)
            else:
                for msg in payloads:
                    if isinstance(msg, Progress):
                        self._carry_out(self.core.on_progress(msg), now)
                    else:
                        self._carry_out(self.core.on_slice(slice_result(msg), msg.epoch, now, msg), now)
            self.store.ack_dispatch(name, ids)
        return bool(batches)

    def _carry_out(self, commands: list[Command], now: float) -> None:
        for cmd in commands:
            if isinstance(cmd, Post):
                if self._posts is not None:  # batched with the round's other posts while a round is planned
                    self._posts.append((cmd.replica_id, cmd.message))
                else:
                    self.store.post_batch(cmd.replica_id, cmd.message)
            elif isinstance(cmd, Commit):
                self._carry_out(self.core.on_committed(cmd, self._commit(cmd), now), now)
            elif isinstance(cmd, CommitProgress):
                rows = [(o.id, o.tokens, "", o.at) for o in cmd.rows]
                if self.store.apply_result(None, cmd.replica_id, rows, slice_end=False) == CommitOutcome.GAP:
                    log.warning("progress from %s skipped: tokens before it are missing", cmd.replica_id)
            elif isinstance(cmd, Finish):
                rec = self.store.record(cmd.request_id)
                if rec is not None and rec.status != "done":
                    self.store.finish(cmd.request_id, cmd.status)
            elif isinstance(cmd, ForgetReplica):
                self.store.forget_replica(cmd.replica_id)
            elif isinstance(cmd, HandOver):
                self.store.announce(cmd.request_ids)
            elif isinstance(cmd, Repost):
                self.store.post_result(cmd.message)
            elif isinstance(cmd, LogTiming):
                self.store.log_slice(cmd.timing)
            # Completed: the commit closed their records already

    def _commit(self, cmd: Commit) -> CommitOutcome:
        slice_end, aborted = FinishReason.SLICE_END.value, FinishReason.ABORTED.value
        rows = [(o.id, o.tokens, "" if o.finish == slice_end else o.finish, o.at)
                for o in cmd.report.outputs if o.id not in cmd.skip and o.finish != aborted]
        if not rows:
            return CommitOutcome.APPLIED
        return CommitOutcome(self.store.apply_result(cmd.batch_id, cmd.replica_id, rows))

    def _check_replicas(self, now: float) -> None:
        alive, dead = self.store.replicas_alive()
        for rid in dead:
            self._carry_out(self.core.on_replica_lost(rid, now), now)
        for rid in alive:
            if not self.core.knows(rid):
                info = self.store.replica_info(rid)
                keeps = info is not None and info.keeps_kv
                self.core.on_replica_joined(rid, now, keeps_kv=keeps,
                                            kv_budget_bytes=info.kv_budget_bytes if info is not None else None)
                log.info("replica %s joined (%s KV caches between slices)", rid, "keeps" if keeps else "keeps no")

    def _dispatch(self, now: float) -> None:
        self._posts = []
        try:
            self._carry_out(self.core.tick(now), now)
        finally:
            if self._posts:  # every placement of the round in one round trip
                self.store.post_batches(self._posts)
            self._posts = None

    # ---- views ---------------------------------------------------------------------------------------
    def snapshot(self, now: float) -> MetricsSnapshot:
        replica_ids = sorted(self.scheduler.replicas)
        return self.core.snapshot(now, self.store.busy_seconds(replica_ids) if replica_ids else {})

    def backlog_seconds(self, now: float) -> float:
        return self.core.backlog_seconds(now)


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
        log.info("DP batcher compiled in %.2f s", compile_now())
        store = DispatcherStore.connect(cfg.redis)
        self.loop = DispatchLoop(cfg, latency, memory, store)
        self.loop.start()

    def ready(self) -> bool:
        return self.loop.healthy and not self.loop.fenced

    def check_health(self) -> None:
        if not self.loop.healthy:
            raise RuntimeError(f"dispatcher loop stopped: {self.loop.error!r}")

    def snapshot(self) -> MetricsSnapshot:
        return self.loop.snapshot(time.time())

    def __del__(self):
        self.loop.stop()
